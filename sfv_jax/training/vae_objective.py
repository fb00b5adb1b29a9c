"""The toy VAE's objective: SVD's VAE architecture (``models.vae``) trained from random weights for the
toy world (``cli/toy_world.py``), as pure functions. The real SVD VAE is never trained by this project.

    loss, metrics = vae_loss(vae, params, video, key, kl_weight=1e-3)    # video [B, F, H, W, 3] in [-1, 1]
    scale = latent_scaling_factor(vae, params, video)                     # 1 / std of the posterior means

Reconstruction plus KL, as in the VAE SVD starts from (Rombach et al. 2022, without its perceptual and GAN
terms: at 32x32 the squared error alone gives sharp enough frames, measured by held-out PSNR).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def _frames(video: jax.Array) -> jax.Array:
    """[B, F, H, W, C] -> [B*F, H, W, C] (frame fastest): the encoder sees each frame alone, as in SVD."""
    return video.reshape(-1, *video.shape[2:])


def vae_loss(
    vae: nn.Module, params: Any, video: jax.Array, key: jax.Array, *, kl_weight: float
) -> tuple[jax.Array, dict]:
    """Mean squared reconstruction error per element + ``kl_weight`` * KL(q(z|x) || N(0, I)) per latent
    element. Every frame is encoded alone, z = mean + exp(logvar / 2) * eps is sampled, and the clip is
    decoded in one call (the temporal decoder mixes its frames). ``video`` [B, F, H, W, 3] in [-1, 1].
    Returns (loss, {"mse", "kl"})."""
    b, f = video.shape[:2]
    mean, logvar = vae.apply({"params": params}, _frames(video), method=vae.encode_moments)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.apply({"params": params}, z.reshape(b, f, *z.shape[1:]), method=vae.decode)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - video.astype(jnp.float32)))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def reconstruct(vae: nn.Module, params: Any, video: jax.Array) -> jax.Array:
    """Encode every frame (posterior mean, what SVD uses) and decode the clip: [B, F, H, W, 3] -> same."""
    return vae.apply({"params": params}, video)  # the model's __call__: exactly this


def latent_std(vae: nn.Module, params: Any, video: jax.Array) -> jax.Array:
    """Standard deviation of the posterior means over every element of ``video``'s frames."""
    return jnp.std(vae.apply({"params": params}, _frames(video), method=vae.encode).astype(jnp.float32))


def latent_scaling_factor(vae: nn.Module, params: Any, video: jax.Array) -> float:
    """The ``scaling_factor`` that gives the scaled latents unit std on ``video`` (as SD's 0.18215 was
    measured on its data): every noise level of SVD's schedules assumes unit-variance latents."""
    return float(1.0 / latent_std(vae, params, video))
