"""Full-size SVD coverage without downloading anything: diffusers on the meta device vs jax.eval_shape."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from sfv_jax.checkpoint import components, convert, pretrained
from sfv_jax.models import presets
from sfv_jax.models.unet import init_inputs
from sfv_jax.testing import torch_reference as ref


@pytest.fixture(scope="module")
def full_model():
    return pretrained.unet_from_config(presets.UNETS["svd"])


@pytest.fixture(scope="module")
def boxed(full_model):
    return pretrained.abstract_params(full_model, boxed=True)


@pytest.fixture(scope="module")
def abstract(boxed):
    return nn.meta.unbox(boxed)


def test_every_svd_tensor_maps_onto_the_flax_model(abstract):
    torch_shapes = ref.meta_unet_shapes(presets.UNETS["svd"])
    assert len(torch_shapes) == 1428
    assert sum(math.prod(s) for s in torch_shapes.values()) == 1_524_623_082
    plan = convert.layout(abstract)
    convert.check_compatible(torch_shapes, plan, "full SVD UNet")  # raises on any difference
    assert set(plan) == set(torch_shapes)  # nothing left over on either side
    leaves = jax.tree.leaves(abstract)
    assert len(leaves) == 1428
    assert sum(math.prod(x.shape) for x in leaves) == 1_524_623_082


def test_full_size_forward_and_encoder_shapes(full_model, abstract):
    """768x448 training size, 14 frames: the discriminator feature maps of method notes sec. 3."""
    params = abstract
    inputs = init_inputs(full_model.config, batch=1, frames=14, height=56, width=96)
    out = jax.eval_shape(lambda p, *a: full_model.apply({"params": p}, *a), params, *inputs)
    assert out.shape == (1, 14, 56, 96, 4)
    feats = jax.eval_shape(lambda p, *a: full_model.apply({"params": p}, *a, method=full_model.encode), params, *inputs)
    assert [f.shape for f in feats] == [
        (1, 14, 28, 48, 320),
        (1, 14, 14, 24, 640),
        (1, 14, 7, 12, 1280),
        (1, 14, 7, 12, 1280),
    ]


def test_every_parameter_has_logical_axis_names(boxed):
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == 1428
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    specs = nn.get_partition_spec(boxed)
    assert specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"][
        "kernel"
    ] == jax.sharding.PartitionSpec("embed", "heads")


def test_bf16_compute_keeps_fp32_params(abstract):
    model = pretrained.unet_from_config(presets.UNETS["svd"], dtype=jnp.bfloat16)
    params = abstract
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(
        lambda p, *a: model.apply({"params": p}, *a), params, *init_inputs(model.config, 1, 14, 72, 128)
    )
    assert out.shape == (1, 14, 72, 128, 4) and out.dtype == jnp.bfloat16


def _meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("component", ["vae", "image_encoder"])
def test_full_size_vae_and_image_encoder_map_exactly(component):
    """SVD's VAE (374 tensors, 97,742,847 params) and ViT-H/14 (520 tensors, 632,076,800 params),
    built by diffusers / transformers on the meta device, map onto jax.eval_shape of our modules."""

    if component == "vae":
        from diffusers import AutoencoderKLTemporalDecoder

        cfg, n_tensors, n_params = presets.VAES["svd"], 374, 97_742_847
        shapes = _meta_state_shapes(
            lambda: AutoencoderKLTemporalDecoder(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        )
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg, n_tensors, n_params = presets.IMAGE_ENCODERS["svd"], 520, 632_076_800
        shapes = _meta_state_shapes(
            lambda: CLIPVisionModelWithProjection(
                CLIPVisionConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
            )
        )
    shapes = {k: s for k, s in shapes.items() if not k.endswith("position_ids")}
    assert len(shapes) == n_tensors and sum(math.prod(s) for s in shapes.values()) == n_params
    abstract = components.COMPONENTS[component].abstract_params(cfg)
    plan = convert.layout(abstract)
    convert.check_compatible(shapes, plan, f"full SVD {component}")
    assert set(plan) == set(shapes)


def test_full_size_vae_shapes():
    """1024x576 frames <-> 128x72 latents; decode of 14 frames in chunks of 7."""
    from sfv_jax.models.vae import decode_latents

    vae = pretrained.vae_from_config(presets.VAES["svd"])
    params = pretrained.abstract_params(vae)
    mean = jax.eval_shape(
        lambda p, x: vae.apply({"params": p}, x, method=vae.encode),
        params,
        jax.ShapeDtypeStruct((1, 576, 1024, 3), jnp.float32),
    )
    assert mean.shape == (1, 72, 128, 4)
    frames = jax.eval_shape(
        lambda p, z: decode_latents(vae, p, z, 7), params, jax.ShapeDtypeStruct((1, 14, 72, 128, 4), jnp.float32)
    )
    assert frames.shape == (1, 14, 576, 1024, 3)
