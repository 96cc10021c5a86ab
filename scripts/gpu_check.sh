#!/usr/bin/env bash
# The one prepared GPU check: build the CUDA extension, run tests/gpu, time the kernel against its
# baselines, one bf16 and one FP8 train step with MFU, SGLang colocated through one RL step.
# Writes benchmarks/results/gpu_check_<date>.json. Stages whose package does not import here (TE,
# SGLang) are recorded as skipped with the reason. Plan: at most 8 minutes on one H100.
#
#   scripts/gpu_check.sh              # on a GPU node, from the repository root
#   scripts/gpu_check.sh --dry-run    # anywhere: print the plan and check it (CI runs this)
#
# On an offline node, runtime wheels carried in .whl/ (../shared/offline/fetch_wheels.sh) are
# installed first; the node's own torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

if [ "$dry" = 0 ]; then
  t0=$(date +%s)
  if ! "$PY" -c "import megatron.core" >/dev/null 2>&1 && [ -d .whl ]; then
    # As ../shared/offline/fetch_wheels.sh prints: a target dir, so the image's own packages
    # (torch above all) are never touched.
    echo "[gpu_check] installing runtime wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "[gpu_check] building the extension (CUDA where torch has it and nvcc is found)"
  if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20; then
    echo "[gpu_check] editable install refused here; building the extension in place instead"
    "$PY" setup.py -q build_ext --inplace
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import dualrpo_mcore._C as c, torch; print('[gpu_check] extension built; CUDA kernels compiled in:', c.has_cuda(), '| torch', torch.__version__, 'cuda', torch.version.cuda)"
  setup=$(( $(date +%s) - t0 ))
  echo "[gpu_check] set-up took ${setup} s"
  exec "$PY" -m dualrpo_mcore.bench.gpu_check --setup-s "$setup" "$@"
fi
exec "$PY" -m dualrpo_mcore.bench.gpu_check "$@"
