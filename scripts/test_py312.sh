#!/usr/bin/env bash
# The second test leg (`make test-py312`): Python 3.12, megatron-core 0.19.x, the newest
# transformers 5.x, and the C++ kernel required. It runs the tests that touch Megatron-Core or the
# model/rollout code, since those are what a megatron-core or transformers release can break.
#
# Its venv (.venv312 unless VENV312 says otherwise) is built once and reused: a second run only
# reinstalls the package when sources changed. Where no Python 3.12 is found the leg is skipped
# with the reason and exits 0, so `make test` machines without one still pass CI.
#
#   PYTHON312=/path/to/python3.12   use this interpreter instead of searching
#   PY312_TESTS="tests/..."          run these instead of the default selection
#   PY312_PYTEST_ARGS="..."          extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV312:-.venv312}
# torch is pinned: on 3.12 the registry only has the CUDA build, and an unpinned install would take
# whatever newer one appeared, moving the leg under us.
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
MCORE_PIN=${MCORE_PIN:-megatron-core>=0.19,<0.20}
TRANSFORMERS_PIN=${TRANSFORMERS_PIN:-transformers>=5.25,<6}
# The Megatron-dependent tests (distributed, e2e, trainer, models) and what this leg changes (build,
# kernels, env report). The model and rollout tests run in scripts/test_deprecations.sh instead,
# with deprecations as errors, so they are not run twice. Left to the first leg, to keep CI inside its
# budget: `bench step` (it times the same loop test_rl_cli and test_rl_loop run here, ~60 s), the demo
# end to end (the same loop again plus SFT and plots, ~40 s), the local nemo-run launch (nemo-run and
# torchrun, not Megatron, ~20 s), the planner's measured-bytes check (~60-100 s; the actor's build on
# 0.19 is exercised by the actor, checkpoint and fused-head tests here), `bench train` (~25 s; it times
# the actor that the packed-actor and trainer-actor tests check here) and the `train` CLI end to end
# (~20 s; argument handling is version-independent, and test_rl_loop runs the same loop here).
PY312_TESTS=${PY312_TESTS:-"tests/distributed tests/e2e tests/unit/test_trainer_*.py tests/unit/test_rl_steps.py
  tests/unit/test_actor_token_padding.py tests/unit/test_token_stats.py tests/unit/test_env_report.py
  tests/unit/test_kernel_report.py tests/unit/test_build_discovery.py tests/unit/test_extras_ranges.py
  tests/unit/test_parallel_cpu_compat.py tests/unit/test_cli.py tests/unit/test_qwen_packing.py
  --ignore=tests/distributed/test_qwen_parity.py --ignore=tests/distributed/test_rollout_sync.py
  --ignore=tests/distributed/test_faults.py
  --ignore=tests/e2e/test_bench_step.py --ignore=tests/e2e/test_demo.py --ignore=tests/e2e/test_launch_local.py
  --ignore=tests/distributed/test_plan_measured.py --ignore=tests/distributed/test_bench_train.py
  --ignore=tests/e2e/test_rl_cli.py"}

log() { echo "[py312] $*"; }

is_py312() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python312() {
  local cand v
  for cand in "${PYTHON312:-}" python3.12; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && is_py312 "$cand"; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv's python3.12 shim refuses to run unless 3.12 is selected, so ask pyenv for the real path.
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -rV); do
      cand=$(PYENV_VERSION=$v pyenv which python 2>/dev/null || true)
      if [ -n "$cand" ] && is_py312 "$cand"; then echo "$cand"; return 0; fi
    done
  fi
  if command -v uv >/dev/null 2>&1; then
    cand=$(uv python find 3.12 2>/dev/null || true)
    if [ -n "$cand" ] && is_py312 "$cand"; then echo "$cand"; return 0; fi
  fi
  return 1
}

t_start=$(date +%s)
if [ -x "$VENV/bin/python" ] && is_py312 "$VENV/bin/python"; then
  PY312="$VENV/bin/python"
elif ! PY312=$(find_python312); then
  log "SKIPPED: no Python 3.12 found (PYTHON312, python3.12 on PATH, pyenv versions, uv python find)."
  log "SKIPPED: the megatron-core 0.19 / newest-transformers leg did not run; install Python 3.12 to run it."
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY312"
  "$PY312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "installing $TORCH_PIN (on Python 3.12 the registry has only the CUDA build: ~4 GB)"
  "${PIP[@]}" install "$TORCH_PIN"
fi
"$PY" -c "import setuptools, wheel, pybind11" >/dev/null 2>&1 || \
  "${PIP[@]}" install "setuptools>=64" wheel "pybind11>=2.12"
t_torch=$(date +%s)

# The CUDA kernel is built whenever a toolkit is found, though no GPU here can run it: it costs
# ~30 s, and it is the build that broke unnoticed (a wrapper nvcc); test_kernel_report.py then checks
# that the module carries it. Without a toolkit the leg says so and builds the C++ kernel only.
if [ -z "${DUALRPO_BUILD_CUDA:-}" ]; then
  probe="import sys; sys.path.insert(0, '.'); import dualrpo_build as b; sys.exit(b.find_cuda_toolkit() is None)"
  if "$PY" -c "$probe" 2>/dev/null; then
    export DUALRPO_REQUIRE_CUDA_BUILD=1
  else
    log "no CUDA toolkit found: DUALRPO_BUILD_CUDA=0 (C++ kernel only)"
    export DUALRPO_BUILD_CUDA=0
  fi
fi
stamp="$VENV/.dualrpo-installed-test"
newest=$(find setup.py pyproject.toml dualrpo_build.py CMakeLists.txt csrc -newer "$stamp" 2>/dev/null \
  | head -1 || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ]; then
  log "installing dualrpo-mcore[test] with $MCORE_PIN, $TRANSFORMERS_PIN (editable, no build isolation)"
  "${PIP[@]}" install --no-build-isolation -e ".[test]" "$MCORE_PIN" "$TRANSFORMERS_PIN"
  touch "$stamp"
fi
t_install=$(date +%s)
"$PY" -m dualrpo_mcore env || { log "dualrpo env reports a version outside the supported ranges"; exit 1; }

bash scripts/test_deprecations.sh "$PY"
t_strict=$(date +%s)
# shellcheck disable=SC2086  # the selection is a word list on purpose (globs included)
DUALRPO_REQUIRE_EXT=1 "$PY" -m pytest -q --timeout=600 -p no:cacheprovider --durations=15 \
  ${PY312_PYTEST_ARGS:-} $PY312_TESTS
t_end=$(date +%s)
log "time: venv+torch $((t_torch - t_start))s, package $((t_install - t_torch))s," \
    "model/rollout tests (deprecations as errors) $((t_strict - t_install))s," \
    "Megatron tests $((t_end - t_strict))s, total $((t_end - t_start))s"
