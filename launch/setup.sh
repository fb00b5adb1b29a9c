#!/usr/bin/env bash
# Creates .venv (if missing) and installs sfv_jax into it (editable, with its pinned dependencies from
# pyproject.toml); the console scripts (sfv-train, sfv-sample, ...) land in .venv/bin.
#   bash launch/setup.sh          runtime dependencies
#   bash launch/setup.sh --dev    + the dev extras: the PyTorch reference (torch 2.13.0 CPU, diffusers,
#                                 transformers), pytest, pytest-xdist, ruff, scipy; and the targets extra
#   bash launch/setup.sh --targets  runtime + the accelerator compilers (sfv-memory --target, sfv-targets):
#                                 the CUDA 13 plugin, ptxas / libdevice / cuDNN wheels, libtpu (~2 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
target="."
if [ "${1:-}" = "--dev" ]; then target=".[dev,targets]"; fi
if [ "${1:-}" = "--targets" ]; then target=".[targets]"; fi
echo "[setup] installing -e $target"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
echo "[setup] done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
