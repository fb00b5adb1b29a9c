"""Loading SVD models: from diffusers / transformers folders (converted on the fly) or converted sfv_jax
checkpoints.

    from sfv_jax.checkpoint import pretrained
    model, params = pretrained.load_unet("stable-video-diffusion-img2vid/unet")
    vae, vae_params = pretrained.load_vae("stable-video-diffusion-img2vid")            # the vae/ subfolder
    clip, clip_params = pretrained.load_image_encoder("stable-video-diffusion-img2vid")
    pipe = pretrained.load_pipeline("stable-video-diffusion-img2vid", dtype=jnp.bfloat16)
    frames = pipe(image)                                                               # [F, H, W, 3] in [0, 1]

Every path may be a component folder, a whole pipeline folder (the component's subfolder is used), or
the converted equivalent (``python -m sfv_jax.cli.convert``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.checkpoint import components, convert
from sfv_jax.checkpoint.safetensors_io import CheckpointError, open_weights
from sfv_jax.diffusion.pipeline import SVDPipeline
from sfv_jax.models.build import (
    abstract_params,
    image_encoder_from_config,
    init_args,
    logical_axes,
    unet_from_config,
    vae_from_config,
)
from sfv_jax.models.clip import CLIPVisionWithProjection
from sfv_jax.models.unet import UNetSpatioTemporal
from sfv_jax.models.vae import AutoencoderKLTemporalDecoder

# the builders are part of this module's public API (``pretrained.unet_from_config(cfg)``); they live in models
__all__ = [
    "abstract_params",
    "image_encoder_from_config",
    "init_args",
    "load",
    "load_image_encoder",
    "load_pipeline",
    "load_unet",
    "load_vae",
    "logical_axes",
    "unet_from_config",
    "vae_from_config",
]


def load(
    component: str,
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = jnp.float32,
    variant: str | None = None,
    progress: bool = True,
    **build_options: Any,
) -> tuple[nn.Module, dict]:
    """``(model, params)`` of ``component`` (``unet``, ``vae``, ``image_encoder``) at ``path``. ``dtype`` is
    the compute dtype, ``param_dtype`` the parameters'; ``build_options`` go to the component's builder
    (``remat_policy`` for the UNet, ``attention_impl`` for all)."""
    comp = components.COMPONENTS[component]
    folder = components.component_folder(Path(path), comp)
    if folder.is_file():
        raise CheckpointError(f"{folder}: pass the {component} folder (config.json + weights), not a file")
    config = components.read_config(folder)
    try:
        model = comp.build(config, dtype=dtype, param_dtype=param_dtype, **build_options)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), abstract_params(model))
    if components.is_converted(folder):
        return model, convert.load_converted(folder, abstract, component)
    weights = open_weights(folder, comp.weights_stem, variant)
    what = f"{component} {weights.description}"
    params = convert.torch_to_flax(weights, abstract, dtype=param_dtype, what=what, progress=progress)
    return model, jax.tree.map(jnp.asarray, params)


def load_unet(path: str | os.PathLike, dtype: Any = jnp.float32, **options: Any) -> tuple[UNetSpatioTemporal, dict]:
    """``(model, params)`` of the UNet; options: ``param_dtype``, ``variant``, ``remat_policy``,
    ``attention_impl``, ``progress`` (:func:`load`)."""
    return load("unet", path, dtype, **options)


def load_vae(
    path: str | os.PathLike, dtype: Any = jnp.float32, **options: Any
) -> tuple[AutoencoderKLTemporalDecoder, dict]:
    """``(model, params)`` of the temporal-decoder VAE (``vae/``); options as :func:`load`."""
    return load("vae", path, dtype, **options)


def load_image_encoder(
    path: str | os.PathLike, dtype: Any = jnp.float32, **options: Any
) -> tuple[CLIPVisionWithProjection, dict]:
    """``(model, params)`` of the CLIP image encoder (``image_encoder/``); options as :func:`load`."""
    return load("image_encoder", path, dtype, **options)


def load_pipeline(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = jnp.float32,
    variant: str | None = None,
    attention_impl: str | None = None,
    progress: bool = True,
):
    """The whole image-to-video pipeline (:class:`sfv_jax.diffusion.pipeline.SVDPipeline`) from a diffusers SVD folder
    (``model_index.json``, ``unet/``, ``vae/``, ``image_encoder/``, ``feature_extractor/``) or its
    converted copy. ``dtype`` is the compute dtype of the UNet and image encoder; the VAE encodes in
    float32 (as diffusers' ``force_upcast``) and decodes in ``dtype``."""
    root = Path(path)
    components.check_pipeline_folder(root)
    opts = dict(param_dtype=param_dtype, variant=variant, attention_impl=attention_impl, progress=progress)
    unet = load_unet(root, dtype, **opts)
    vae = load_vae(root, dtype, **opts)
    image_encoder = load_image_encoder(root, dtype, **opts)
    return SVDPipeline.from_components(unet, vae, image_encoder, folder=root)
