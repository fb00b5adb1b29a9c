"""Sinusoidal timestep features and the two-layer MLP that embeds them (diffusers ``Timesteps`` /
``TimestepEmbedding``)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.primitives import dense

Dtype = Any


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, always in float32.

    ``t`` [N] -> [N, dim]. freq_i = exp(-ln(max_period) * i / (half - shift)), i < half = dim // 2;
    features [sin(t f), cos(t f)], flipped to [cos, sin] when ``flip_sin_to_cos`` (SVD: True, shift 0).
    An odd ``dim`` gets one zero column at the end, as diffusers pads.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``: [N, D_in] -> [N, out_dim]."""

    hidden_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.hidden_dim, ("embed", "mlp"), name="linear_1", **kw)(x.astype(self.dtype))
        x = nn.silu(x)
        return dense(self.out_dim, ("mlp", "embed"), name="linear_2", **kw)(x)
