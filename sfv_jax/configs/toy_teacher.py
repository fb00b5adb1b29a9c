"""A toy SVD teacher trained from random weights with the diffusion objective on the embedded synthetic
moving-shapes videos, at a size a 2-core CPU trains: the toy UNet preset, 32x32 frames (16x16 latents),
14 frames at 7 FPS, batch 8 (2 x 4 accumulation), AdamW lr 1e-3 with 200 warm-up steps. The toy-scale
reproduction of SF-V distils from it.

Run:
  python -m sfv_jax.main --config configs/toy_teacher.py --workdir runs/toy_teacher
  python -m sfv_jax.export --workdir runs/toy_teacher --out checkpoints/toy_teacher
Quick check of the objective (the held-out denoising loss falls): --config.total_steps=100
"""

from __future__ import annotations

import ml_collections

from sfv_jax.configs import svd_finetune, tiny


def get_config() -> ml_collections.ConfigDict:
    c = svd_finetune.diffusion_recipe(tiny.get_config(), lr=1e-3, warmup_steps=200)
    c.total_steps = 4000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.sample_every_steps = 1000
    c.model.unet["num_frames"] = 14
    c.data.height, c.data.width, c.data.num_frames = 32, 32, 14
    c.data.micro_batch = 2
    c.data.accum_steps = 4
    c.sample.height, c.sample.width = 32, 32
    return c
