"""The SF-V pipeline at toy size, for a CPU: tiny random-init UNet / VAE / CLIP, synthetic videos
(16x16, 4 frames), 400 steps; the README's Quickstart (about 4 minutes on a 2-core CPU: ~1.5 min of
compilation, then ~2.8 steps/s).

Run:
  sfv-train --config tiny --workdir runs/tiny        (or: python -m sfv_jax.cli.train --config configs/tiny.py ...)
Overrides: --config.total_steps=20 --config.seed=1 --config.init_from=path/to/converted_svd ...
"""

from __future__ import annotations

import ml_collections

from sfv_jax.configs import sfv_svd
from sfv_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    c = sfv_svd.get_config()
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.sample_every_steps = 200
    c.keep_checkpoints = 2
    c.init_from = None  # random init from the model configs below
    c.model.dtype = "float32"
    c.model.remat_policy = "none"  # nothing to save at this size; compiles faster
    c.model.attention_impl = None  # chunked on a CPU

    # the toy preset (sfv_jax.models.presets): a 2-level UNet, a 2-level VAE, a 1-layer ViT
    c.model.unet = dict(presets.UNETS["toy"])
    c.model.vae = dict(presets.VAES["toy"])
    c.model.image_encoder = dict(presets.IMAGE_ENCODERS["toy"])

    c.mesh.data, c.mesh.fsdp = -1, 1  # every device data parallel (one on a CPU)
    c.data.height, c.data.width, c.data.num_frames = 16, 16, 4
    c.data.micro_batch = 1
    c.data.accum_steps = 2
    c.data.workers = 2  # loader threads: a small CPU

    c.disc.channels = 32
    # 4 GroupNorm groups of 8 channels: with the paper's 32 groups each group would be one channel over 4
    # frames (temporal heads) or 2x2 pixels (spatial heads), a variance of 4 numbers whose backward pass
    # amplifies round-off ~200x (measured: sharded vs single-device generator gradients 1.6e-4 with 32
    # groups, 7.6e-7 with 4)
    c.disc.groups = 4
    c.disc.proj_dim = 16
    c.sample.height, c.sample.width = 16, 16
    return c
