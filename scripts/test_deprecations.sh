#!/usr/bin/env bash
# The model and rollout tests with DeprecationWarning as an error, except the third-party ones in
# tests/deprecations_allowed.txt. The filters are given to the interpreter (python -W), not to
# pytest, so that the gloo workers the distributed tests spawn inherit them too.
#
#   scripts/test_deprecations.sh PYTHON [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: test_deprecations.sh PYTHON [pytest args]}
shift
filters=(-W error::DeprecationWarning -W error::FutureWarning)
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  filters+=(-W "$line")
done < tests/deprecations_allowed.txt
DUALRPO_REQUIRE_EXT=1 "$PY" "${filters[@]}" -m pytest -q --timeout=600 -p no:cacheprovider "$@" \
  tests/unit/test_qwen_*.py tests/unit/test_rollout_*.py \
  tests/distributed/test_qwen_parity.py tests/distributed/test_rollout_sync.py
