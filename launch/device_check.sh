#!/usr/bin/env bash
# The prepared device check (docs/benchmarks.md): UNet forward (cuDNN and XLA attention) against diffusers, the 1-step
# pipeline per stage, one SF-V and one diffusion training step (time, MFU, measured peak memory beside the
# planner's figure); one table on stdout, JSON in $OUT (or ./device_check) after every part. Sized for one
# H200 in under 10 minutes; on a CPU it runs the smoke variant (tiny sizes, what CI runs).
#
#   bash launch/device_check.sh [--smoke] [--parts unet_cudnn,train_sfv,...]
#
# On a GPU machine without network access (jax, flax, optax, orbax, torch, transformers present): put the
# missing wheels in .whl/ (Python 3.12, manylinux x86_64): at least
# diffusers, ml-collections, clu, einops, grain, tensorflow-datasets' pure-Python deps as needed. This
# script installs whatever .whl/ holds into /tmp/site and the package itself without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-device_check}"
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"   # the checkout, no install step needed
export PYTHONUNBUFFERED=1
if python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  source launch/xla_flags.sh
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT_DIR/xla_cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
"$PY" -m sfv_jax.bench check --json "$OUT_DIR/device_check.json" "$@" 2>&1 | tee "$OUT_DIR/device_check.log"
