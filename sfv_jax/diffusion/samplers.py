"""Samplers of the SVD teacher and the SF-V generator (pure functions; loops in ``jax.lax``).

Both take a :data:`sfv_jax.diffusion.edm.VelocityFn` ``(x_in, c_noise) -> v`` (the UNet with its conditioning
bound; see ``sfv_jax.diffusion.pipeline``) and explicit unit-Gaussian noise, so results are reproducible and
comparable between samplers, runs and machines. Jit them with the velocity function closed over, or
call them inside a jitted function; the number of steps is the static length of the sigma array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfv_jax.diffusion.edm import VelocityFn, denoise, init_noise_sigma


def guidance_scales(min_scale: float, max_scale: float, num_frames: int) -> jax.Array:
    """SVD's per-frame guidance: linspace(min, max, F) -> [F] (frame 0 gets min, the last frame max)."""
    return jnp.linspace(jnp.float32(min_scale), jnp.float32(max_scale), num_frames, dtype=jnp.float32)


def null_condition(image_latents: jax.Array, image_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unconditional branch's inputs of classifier-free guidance: zero conditioning latents and zero
    image embeddings (SVD's; ``added_time_ids`` stay). Training's conditioning dropout feeds the same."""
    return jnp.zeros_like(image_latents), jnp.zeros_like(image_embeds)


def apply_guidance(v_uncond: jax.Array, v_cond: jax.Array, scales: jax.Array) -> jax.Array:
    """Classifier-free guidance per frame: v_u + g_f * (v_c - v_u). ``v_*`` [B, F, h, w, C], ``scales`` [F]."""
    return v_uncond + scales[None, :, None, None, None] * (v_cond - v_uncond)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """The SVD teacher: Euler over ``sigmas`` (high to low, ending in 0; :func:`sfv_jax.diffusion.edm.euler_sigmas`),
    exactly diffusers' EulerDiscreteScheduler (v-prediction, s_churn 0) as driven by its SVD pipeline.

    ``noise`` [B, F, h, w, 4] unit Gaussian; x_0 = noise * sqrt(sigma_0^2 + 1). Per step i:
    x0 = D(x; sigma_i), x <- x + (x - x0) / sigma_i * (sigma_{i+1} - sigma_i); the last step lands on x0.
    Guidance, if any, lives in ``velocity_fn``. Returns the final latents [B, F, h, w, 4], float32.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x = noise.astype(jnp.float32) * init_noise_sigma(sigmas[0])

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(velocity_fn, x, sigma)
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, x)


def sfv_sample(velocity_fn: VelocityFn, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """The SF-V generator (paper Sec. 3.2-3.3; docs/method.md, "Sampling"): no guidance.

    ``sigmas`` [n] high to low (:func:`sfv_jax.diffusion.edm.sfv_sigmas`; n = 1 is the paper's single forward pass).
    ``noise`` [n, B, F, h, w, 4] unit Gaussian: ``noise[0]`` starts the chain, x_T = noise[0] *
    sqrt(sigma_0^2 + 1); step i predicts x0 = D(x; sigma_i) and, unless it is the last, re-noises it to
    the next level, x = x0 + sigma_{i+1} * noise[i + 1]. Returns x0 of the last step, float32.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    n = sigmas.shape[0]
    if noise.ndim != 6 or noise.shape[0] != n:
        raise ValueError(f"sfv_sample: noise must be [{n}, B, F, h, w, C] (one draw per step), got {noise.shape}")
    x = noise[0].astype(jnp.float32) * init_noise_sigma(sigmas[0])
    x0 = denoise(velocity_fn, x, sigmas[0])

    def step(i, x0):
        x = x0 + sigmas[i] * noise[i].astype(jnp.float32)
        return denoise(velocity_fn, x, sigmas[i])

    return jax.lax.fori_loop(1, n, step, x0)
