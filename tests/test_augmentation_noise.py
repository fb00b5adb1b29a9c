"""The conditioning frame's augmentation noise under live encoding: drawn from the sample's global position."""

from __future__ import annotations

import jax
import numpy as np


def test_augmentation_noise_is_fresh_each_epoch():
    """Live encoding draws the conditioning frame's augmentation noise from the sample's global position,
    so a record seen again in a later epoch (another position) gets new noise; the same position repeats."""
    from sfv_jax.data.latents import ClipEncoder
    from sfv_jax.models import build, presets

    vae = build.vae_from_config(presets.VAES["toy"])
    clip = build.image_encoder_from_config(presets.IMAGE_ENCODERS["toy"])
    enc = ClipEncoder(
        vae,
        vae.init(jax.random.PRNGKey(0), *build.init_args(vae))["params"],
        clip,
        clip.init(jax.random.PRNGKey(1), *build.init_args(clip))["params"],
    )
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8)
    kw = dict(fps=7, motion_bucket_ids=[127], noise_aug_strength=0.5)
    a, b, again = (enc(frames, np.array([p]), **kw)["image_latents"] for p in (3, 3 + 1000, 3))
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).max() > 1e-3
