#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies into it.
#   bash launch/setup.sh          runtime dependencies (requirements.txt)
#   bash launch/setup.sh --dev    + the PyTorch reference and pytest (requirements-test.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
reqs=(-r requirements.txt)
if [ "${1:-}" = "--dev" ]; then reqs+=(-r requirements-test.txt); fi
echo "[setup] installing ${reqs[*]}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${reqs[@]}"
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
