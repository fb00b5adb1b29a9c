"""Flax modules from diffusers / transformers config dicts, their init inputs and abstract parameters, and
the dtype names every command and config uses (one map).

    unet = unet_from_config(presets.UNETS["svd"], dtype=jnp.bfloat16)   # or any unet/config.json dict
    shapes = abstract_params(unet)                                       # jax.eval_shape: no memory
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from sfv_jax.models.unet import UNetConfig, UNetSpatioTemporal, init_inputs
from sfv_jax.models.vae import AutoencoderKLTemporalDecoder, VAEConfig

# dtype names of configs (``model.dtype``) and command-line flags (``--dtype``)
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COMPUTE_DTYPES = ("float32", "bfloat16")  # what the models are tested to compute in


def unet_from_config(
    config: Mapping[str, Any] | UNetConfig,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat_policy: str = "none",
    attention_impl: str | None = None,
) -> UNetSpatioTemporal:
    """The Flax UNet for a diffusers-style config dict (unused keys such as ``_class_name`` are ignored)."""
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_diffusers(config)
    return UNetSpatioTemporal(
        cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, attention_impl=attention_impl
    )


def vae_from_config(
    config: Mapping[str, Any] | VAEConfig,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str | None = None,
) -> AutoencoderKLTemporalDecoder:
    """The Flax VAE for a diffusers ``vae/config.json`` dict."""
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_diffusers(config)
    return AutoencoderKLTemporalDecoder(cfg, attention_impl, dtype=dtype, param_dtype=param_dtype)


def image_encoder_from_config(
    config: Mapping[str, Any] | CLIPVisionConfig,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str | None = None,
) -> CLIPVisionWithProjection:
    """The Flax CLIP image encoder for a transformers ``image_encoder/config.json`` dict."""
    cfg = config if isinstance(config, CLIPVisionConfig) else CLIPVisionConfig.from_transformers(config)
    return CLIPVisionWithProjection(cfg, attention_impl, dtype=dtype, param_dtype=param_dtype)


def init_args(model: nn.Module) -> tuple:
    """Small zero inputs that run every parameter of an SVD UNet, VAE or CLIP module (for init / eval_shape)."""
    if isinstance(model, UNetSpatioTemporal):
        return init_inputs(model.config)
    if isinstance(model, AutoencoderKLTemporalDecoder):
        f = model.config.downsample_factor
        return (jnp.zeros((1, 1, f, f, model.config.in_channels)),)
    if isinstance(model, CLIPVisionWithProjection):
        s = model.config.image_size
        return (jnp.zeros((1, s, s, model.config.num_channels)),)
    raise TypeError(f"no init inputs known for {type(model).__name__}")


def abstract_params(model: nn.Module, *, boxed: bool = False) -> Mapping:
    """``jax.eval_shape`` of the parameters (no memory used). ``boxed=True`` keeps the logical-axis boxes."""
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args(model)))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def logical_axes(model: nn.Module) -> Mapping:
    """Tree of ``PartitionSpec`` of logical axis names, one per parameter."""
    return nn.get_partition_spec(abstract_params(model, boxed=True))
