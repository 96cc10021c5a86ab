#!/usr/bin/env bash
# Create .venv and install the package with what `make test` / `make demo` need.
# Idempotent: a second run only reinstalls the package itself (fast) when sources changed.
#
#   EXTRAS=test scripts/bootstrap.sh
#
# torch: if the system python already imports torch (a user's CUDA build), the venv is made
# with --system-site-packages so that torch is used as it is; otherwise torch==2.13.0 (CPU) is
# installed first, so nothing later can make pip pick a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

log() { echo "[bootstrap] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    log "system python has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); venv shares it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "installing $TORCH_PIN"
  "${PIP[@]}" install "$TORCH_PIN"
fi
# Build requirements, installed up front because the package build runs without isolation.
"$PY" -c "import setuptools, wheel, pybind11" >/dev/null 2>&1 || \
  "${PIP[@]}" install "setuptools>=64" wheel "pybind11>=2.12"

stamp="$VENV/.dualrpo-installed-$EXTRAS"
newest=$(find setup.py pyproject.toml dualrpo_build.py CMakeLists.txt csrc -newer "$stamp" 2>/dev/null | head -1 || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ]; then
  log "installing dualrpo-mcore[$EXTRAS] (editable, no build isolation)"
  "${PIP[@]}" install --no-build-isolation -e ".[$EXTRAS]"
  touch "$stamp"
fi
"$PY" -c "import torch; import dualrpo_mcore; print('[bootstrap] torch', torch.__version__, '| dualrpo_mcore', dualrpo_mcore.__version__)"
