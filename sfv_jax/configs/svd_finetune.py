"""Fine-tuning SVD itself with its diffusion objective (``objective="diffusion"``): full SVD at its native
1024x576, 14 frames at 7 FPS (``svd_finetune.py:xt``: SVD-XT, 25 frames), micro-batch 1 per device,
FSDP over every device, AdamW (lr 1e-5, 500 warm-up steps, gradient clipping at 1.0, weight decay 0.01),
EDM loss with ln sigma ~ N(0.7, 1.6^2), conditioning-frame noise augmentation drawn per sample
(ln strength ~ N(-3.0, 0.5^2)), 5% conditioning dropout each for the image embedding, both and the
conditioning latent (classifier-free guidance), EMA 0.999. ``--config.trainable=temporal`` trains only
the temporal layers (SVD_Xtend's memory-saving mode).

Run (init_from: the converted SVD folder, ``python -m sfv_jax.cli.convert --src stable-video-diffusion-img2vid
--out checkpoints/svd``; your clips: ``python -m sfv_jax.cli.build_dataset --videos DIR --out data/clips
--fps 7 --height 576 --width 1024``):
  python -m sfv_jax.cli.train --config configs/svd_finetune.py --workdir runs/svd_finetune \
      --config.init_from=checkpoints/svd --config.data.kind=folder --config.data.path=data/clips
  python -m sfv_jax.cli.train --config configs/svd_finetune.py:xt ...     (SVD-XT; init_from the XT folder)
Memory check first, by XLA:GPU for 8 H100s on any host (docs/targets.md; measured 2026-12-06):
  python -m sfv_jax.cli.memory --config configs/svd_finetune.py --mesh fsdp=8 --target h100
      -> trainable=all: peak 30.25 GB per device (the diffusion step; 26.4 GB of it temporaries)
  ... --config.trainable=temporal -> 32.35 GB (the activations dominate: no saving at this size)
  python -m sfv_jax.cli.memory --config configs/svd_finetune.py:xt --mesh fsdp=8 --target h100
      -> SVD-XT, 25 frames: 40.01 GB
  (--target a100: all layers 15.89, temporal 12.02, SVD-XT 25.66 GB; docs/scaling.md)
Export the EMA for sampling: python -m sfv_jax.cli.export --workdir runs/svd_finetune --out checkpoints/svd_ft
"""

from __future__ import annotations

import ml_collections

from sfv_jax.configs import sfv_svd
from sfv_jax.models import presets


def get_config(variant: str = "svd") -> ml_collections.ConfigDict:
    if variant not in ("svd", "xt"):
        raise ValueError(f"configs/svd_finetune.py:{variant}: the variant is 'svd' (14 frames) or 'xt' (25 frames)")
    c = diffusion_recipe(sfv_svd.get_config(), lr=1e-5, warmup_steps=500)
    preset = "svd" if variant == "svd" else "svd_xt"
    c.total_steps = 20_000
    c.sample_every_steps = 1000
    # the architecture when init_from is not given (random init, the memory planner); init_from's otherwise
    c.model.unet = dict(presets.UNETS[preset])
    c.model.vae = dict(presets.VAES[preset])
    c.model.image_encoder = dict(presets.IMAGE_ENCODERS[preset])
    c.data.height, c.data.width = 576, 1024
    c.data.num_frames = presets.UNETS[preset]["num_frames"]
    c.data.micro_batch = 1
    c.data.accum_steps = 1
    c.sample.height, c.sample.width = 576, 1024
    return c


def diffusion_recipe(c: ml_collections.ConfigDict, *, lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
    """The diffusion-objective training recipe on any config (this file's and ``toy_teacher``'s): SVD's
    loss, per-sample lognormal noise augmentation, AdamW with warm-up and clipping at 1.0, EMA 0.999,
    teacher samples at 25 Euler steps (guidance 1 -> 3)."""
    c.objective = "diffusion"
    c.data.noise_aug = "lognormal"
    c.opt.optimizer = "adamw"
    c.opt.generator_lr = lr
    c.opt.warmup_steps = warmup_steps
    c.opt.clip_norm = 1.0
    c.opt.ema_rate = 0.999
    c.sample.steps = 25
    return c
