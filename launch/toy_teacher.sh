#!/usr/bin/env bash
# Rebuild the shipped toy teacher (sfv_jax/assets/toy_teacher) from nothing, on a CPU. Each step
# is resumable and skipped once its output exists; rerun the script after an interruption.
#
#   bash launch/toy_teacher.sh [RUNS_DIR]          (default runs/; the folder to ship: RUNS_DIR/toy_teacher_export)
#
# 1. the toy world: the toy VAE trained on the toy clips, a fixed random image encoder, a random UNet;
# 2. a pre-encoded latent dataset of the toy clips (the teacher's loop then runs no VAE);
# 3. the teacher: the toy UNet trained with SVD's diffusion objective (configs/toy_teacher.py);
# 4. its export (EMA UNet + the toy world's VAE and image encoder): the pipeline folder that is shipped.
# Wall times on the 2-core CI-class CPU: see sfv_jax/assets/toy_teacher/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs}"
PY="${PYTHON:-.venv/bin/python}"
CLIPS="${TOY_TEACHER_CLIPS:-2048}"   # latent dataset size (clips of 14 frames)
step() { echo "[toy_teacher] $(date -u +%H:%M:%S) $*"; }

if [ ! -d "$RUNS/toy_init" ]; then
  step "toy world -> $RUNS/toy_init"
  "$PY" -m sfv_jax.cli.toy_world --workdir "$RUNS/toy_vae" --out "$RUNS/toy_init" --seed 0
fi
if [ ! -d "$RUNS/toy_latents" ]; then
  step "encoding $CLIPS clips -> $RUNS/toy_latents"
  "$PY" -m sfv_jax.cli.encode_dataset --config configs/toy_teacher.py --out "$RUNS/toy_latents" \
    --limit "$CLIPS" --config.init_from="$RUNS/toy_init"
fi
if [ ! -d "$RUNS/toy_teacher_export" ]; then
  step "training the teacher in $RUNS/toy_teacher"
  "$PY" -m sfv_jax.cli.train --config configs/toy_teacher.py --workdir "$RUNS/toy_teacher" \
    --config.init_from="$RUNS/toy_init" --config.data.kind=latents --config.data.path="$RUNS/toy_latents"
  step "exporting -> $RUNS/toy_teacher_export"
  "$PY" -m sfv_jax.cli.export --workdir "$RUNS/toy_teacher" --out "$RUNS/toy_teacher_export" --dtype bfloat16
fi
step "done: $RUNS/toy_teacher_export"
