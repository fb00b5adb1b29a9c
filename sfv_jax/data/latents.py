"""Pixel clips -> the training batch (video latents, conditioning-frame latent, image embedding, ids),
encoded on the fly with the JAX VAE and CLIP image encoder exactly as the SVD pipeline conditions.

    encoder = ClipEncoder(vae, vae_params, image_encoder, clip_params)
    batch = encoder(frames_uint8 [B, F, H, W, 3], index [B], fps=7, motion_bucket_ids=[...], noise_aug_strength=0.02)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from sfv_jax.diffusion import conditioning


@dataclasses.dataclass
class ClipEncoder:
    """Encodes clips with the (frozen) VAE and image encoder; jitted once per shape.

    * ``latents`` [B, F, h, w, 4]: every frame's VAE posterior mean x ``scaling_factor`` (what the UNet sees)
    * ``image_latents`` [B, h, w, 4]: frame 0 + noise_aug_strength * N(0, 1), posterior mean, unscaled
      (the strength one for all clips, or one per clip)
    * ``image_embeds`` [B, D]: CLIP embedding of frame 0 (CLIP preprocessing of the reference pipeline)
    * ``added_time_ids`` [B, 3]: [fps - 1, motion_bucket_id, noise_aug_strength]
    The augmentation noise of sample ``index`` comes from ``fold_in(key, index)`` (reproducible per sample).
    ``devices``: split each batch over these devices (data parallel, parameters replicated; a batch is
    padded to a multiple of their count); default: wherever the parameters are.
    """

    vae: Any
    vae_params: Any
    image_encoder: Any
    image_encoder_params: Any
    clip_mean: Sequence[float] = conditioning.CLIP_MEAN
    clip_std: Sequence[float] = conditioning.CLIP_STD
    seed: int = 0
    devices: Sequence[Any] | None = None

    def __post_init__(self):
        self._shard = None
        if self.devices is not None and len(self.devices) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.asarray(self.devices), ("batch",))
            self._shard = NamedSharding(mesh, PartitionSpec("batch"))
            self.vae_params, self.image_encoder_params = jax.device_put(
                (self.vae_params, self.image_encoder_params), NamedSharding(mesh, PartitionSpec())
            )
        vae, clip = self.vae.clone(dtype=jnp.float32), self.image_encoder
        scale = vae.config.scaling_factor

        def encode(vae_params, clip_params, frames, clip_px, index, aug):
            b, f = frames.shape[:2]
            x = frames.astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
            lat = vae.apply({"params": vae_params}, x.reshape(b * f, *x.shape[2:]), method=vae.encode)
            noise = jax.vmap(
                lambda i: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(self.seed), i), x.shape[2:])
            )(index)
            cond = vae.apply({"params": vae_params}, x[:, 0] + aug[:, None, None, None] * noise, method=vae.encode)
            embeds = clip.apply({"params": clip_params}, clip_px)
            return lat.reshape(b, f, *lat.shape[1:]) * scale, cond, embeds

        self._encode = jax.jit(encode)

    def __call__(
        self,
        frames: np.ndarray,
        index: np.ndarray,
        *,
        fps: float,
        motion_bucket_ids: Sequence[float],
        noise_aug_strength: float | np.ndarray,
    ) -> dict[str, np.ndarray]:
        """``noise_aug_strength``: one for every clip, or one per clip [B] (``data.noise_aug``)."""
        size = self.image_encoder.config.image_size
        clip_px = np.stack(
            [
                conditioning.clip_pixels(PIL.Image.fromarray(np.asarray(f[0])), size, self.clip_mean, self.clip_std)
                for f in frames
            ]
        )
        b = frames.shape[0]
        aug = np.broadcast_to(np.asarray(noise_aug_strength, np.float32), (b,)).copy()
        inputs = (np.asarray(frames), clip_px, np.asarray(index, np.int32), aug)
        if self._shard is not None:
            pad = -b % len(self.devices)
            inputs = jax.device_put(tuple(np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in inputs), self._shard)
        lat, cond, embeds = (
            np.asarray(x)[:b] for x in self._encode(self.vae_params, self.image_encoder_params, *inputs)
        )
        ids = np.stack([np.full(b, fps - 1.0), np.asarray(motion_bucket_ids, np.float32), aug], axis=1)
        return {
            "latents": lat,
            "image_latents": cond,
            "image_embeds": embeds,
            "added_time_ids": ids.astype(np.float32),
            "index": np.asarray(index, np.int32),
        }
