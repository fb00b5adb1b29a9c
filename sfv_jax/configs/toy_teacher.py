"""The toy SVD teacher: the toy UNet trained with the diffusion objective on the embedded synthetic
moving-shapes videos at a size a 2-core CPU trains: 32x32 frames (8x8x4 latents of the toy world's trained
VAE), 14 frames at 7 FPS, batch 8, AdamW lr 1e-3 with 200 warm-up steps, EMA 0.995. It starts from the
toy world's pipeline folder (trained VAE, fixed random image encoder, random UNet); the toy-scale SF-V
reproduction distils from its export.

Run: ``bash launch/toy_teacher.sh runs`` (what made the shipped ``sfv_jax/assets/toy_teacher``: the toy world,
2048 pre-encoded clips, this config on them for 4000 steps in 41 min, the bf16 export; each step resumable).
By hand, on pixels (the VAE then encodes 8 clips every step: about 0.8 s more per step at its measured 10 clips/s):
  python -m sfv_jax.cli.toy_world --workdir runs/toy_vae --out runs/toy_init
  sfv-train --config configs/toy_teacher.py --workdir runs/toy_teacher --config.init_from=runs/toy_init
  python -m sfv_jax.cli.export --workdir runs/toy_teacher --out runs/toy_teacher_export --dtype bfloat16
Quick check of the objective (the held-out denoising loss falls): --config.total_steps=100
"""

from __future__ import annotations

import ml_collections

from sfv_jax.configs import svd_finetune, tiny
from sfv_jax.data.synthetic import TOY_DETAIL, TOY_MEAN_COLOUR


def get_config() -> ml_collections.ConfigDict:
    c = svd_finetune.diffusion_recipe(tiny.get_config(), lr=1e-3, warmup_steps=200)
    c.opt.ema_rate = 0.995  # a short run: the EMA averages the last ~200 steps
    c.total_steps = 4000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 2
    c.sample_every_steps = 500
    # the architectures come from init_from (the toy world's folder); these are used without it
    c.model.unet["num_frames"] = 14
    c.data.height, c.data.width, c.data.num_frames = 32, 32, 14
    c.data.synthetic_detail = TOY_DETAIL  # the toy VAE's data: gratings its 8x8 latents can hold
    c.data.synthetic_mean_colour = TOY_MEAN_COLOUR
    # the sampler's fixed 0.02 (as SF-V trains): launch/toy_teacher.sh trains on pre-encoded latents, which
    # hold one augmentation per clip (SVD's per-sample lognormal strengths need on-the-fly encoding)
    c.data.noise_aug = "fixed"
    c.data.micro_batch = 8
    c.data.accum_steps = 1
    c.sample.height, c.sample.width = 32, 32
    return c
