#!/usr/bin/env bash
# Installs what tests/slurm needs to start its private cluster: Debian's slurm 22.05 daemons and
# clients, munge, slurmdbd and MariaDB (nemo-run reads job states with sacct, which needs slurmdbd).
# Never fails: without root, apt or the network it says why and exits 0, and the tests then skip
# with the reason. Every step is time-limited so CI cannot hang here.
set -uo pipefail
PKGS="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
need=0
for b in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || need=1
done
if [ "$need" = 0 ]; then echo "[dev_slurm] already installed"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[dev_slurm] not root or no apt-get: not installing ($PKGS); tests/slurm will skip"; exit 0
fi
t0=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# The packages' init scripts must not start system daemons: the tests run their own, unprivileged.
if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
if ! timeout 120 apt-get install -y -q --no-install-recommends $PKGS >/tmp/dev_slurm_apt.log 2>&1; then
    timeout 90 apt-get update -q >>/tmp/dev_slurm_apt.log 2>&1 &&
        timeout 120 apt-get install -y -q --no-install-recommends $PKGS >>/tmp/dev_slurm_apt.log 2>&1 ||
        { echo "[dev_slurm] apt-get failed (see /tmp/dev_slurm_apt.log); tests/slurm will skip"; tail -3 /tmp/dev_slurm_apt.log; exit 0; }
fi
echo "[dev_slurm] installed $PKGS in $(( $(date +%s) - t0 ))s"
