"""Stand-ins for outside engines that cannot run here, each copying its package's contract from
source and naming the version it copied (docs/design.md section 4)."""
