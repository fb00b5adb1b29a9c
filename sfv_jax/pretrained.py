"""Loading SVD models: from a diffusers folder (converted on the fly) or a converted sfv_jax checkpoint.

    from sfv_jax import pretrained
    model, params = pretrained.load_unet("path/to/stable-video-diffusion-img2vid/unet")
    v = model.apply({"params": params}, sample, timestep, encoder_hidden_states, added_time_ids)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax import convert
from sfv_jax.models.unet import UNetConfig, UNetSpatioTemporal, init_inputs
from sfv_jax.safetensors_io import open_weights


def unet_from_config(config: Mapping[str, Any] | UNetConfig, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, remat_policy: str = "none",
                     attention_impl: str | None = None) -> UNetSpatioTemporal:
    """The Flax UNet for a diffusers-style config dict (unused keys such as ``_class_name`` are ignored)."""
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_diffusers(config)
    return UNetSpatioTemporal(cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                              attention_impl=attention_impl)


def abstract_params(model: UNetSpatioTemporal, *, boxed: bool = False) -> Mapping:
    """``jax.eval_shape`` of the parameters (no memory used). ``boxed=True`` keeps the logical-axis boxes."""
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_inputs(model.config)))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def logical_axes(model: UNetSpatioTemporal) -> Mapping:
    """Tree of ``PartitionSpec`` of logical axis names, one per parameter."""
    return nn.get_partition_spec(abstract_params(model, boxed=True))


def load_unet(path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = jnp.float32,
              variant: str | None = None, remat_policy: str = "none", attention_impl: str | None = None,
              progress: bool = True) -> tuple[UNetSpatioTemporal, dict]:
    """``(model, params)`` from a diffusers UNet folder (or a whole SVD folder with ``unet/``) or a
    converted checkpoint. ``dtype`` is the compute dtype, ``param_dtype`` the parameters' dtype."""
    comp = convert.COMPONENTS["unet"]()
    folder = convert.component_folder(Path(path), comp)
    config = convert.read_config(folder)
    model = unet_from_config(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                             attention_impl=attention_impl)
    abstract = abstract_params(model)
    if convert.is_converted(folder):
        return model, convert.load_converted(folder, abstract)
    weights = open_weights(folder, comp.weights_stem, variant)
    params = convert.torch_to_flax(weights, abstract, dtype=param_dtype, what=f"unet {weights.description}",
                                   progress=progress)
    return model, jax.tree.map(jnp.asarray, params)
