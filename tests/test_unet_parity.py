"""Whole-UNet parity with diffusers (weights through the converter), fp32 and bf16, and the encoder half."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import BF16_TOL, PARITY_TOL, rel_err, video_from_torch, video_to_torch

from sfv_jax.checkpoint import pretrained
from sfv_jax.models import presets
from sfv_jax.testing import torch_reference as ref

NAMES = sorted(presets.UNET_TEST_SHAPES)


@pytest.fixture(scope="module")
def loaded(tiny_unet_dirs):
    return {n: pretrained.load_unet(tiny_unet_dirs[n], progress=False) for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_unet_matches_diffusers_fp32(name, tiny_unets, loaded):
    cfg = presets.UNETS[name]
    inputs = ref.unet_inputs(cfg, *presets.UNET_TEST_SHAPES[name], seed=1)
    want = ref.unet_forward(tiny_unets[name], *inputs)
    model, params = loaded[name]
    got = jax.jit(model.apply)({"params": params}, *map(jnp.asarray, inputs))
    assert got.shape == want.shape
    assert rel_err(got, want) <= PARITY_TOL


def test_scalar_timestep_broadcasts(tiny_unets, loaded):
    name = "tiny_a"
    cfg = presets.UNETS[name]
    sample, _, context, ids = ref.unet_inputs(cfg, *presets.UNET_TEST_SHAPES[name], seed=2)
    want = ref.unet_forward(tiny_unets[name], sample, np.float32(1.25), context, ids)
    model, params = loaded[name]
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(sample), 1.25, jnp.asarray(context), jnp.asarray(ids))
    assert rel_err(got, want) <= PARITY_TOL


@pytest.mark.parametrize("name", NAMES)
def test_unet_bf16_compute_close_to_fp32_reference(name, tiny_unets, tiny_unet_dirs):
    cfg = presets.UNETS[name]
    inputs = ref.unet_inputs(cfg, *presets.UNET_TEST_SHAPES[name], seed=3)
    want = ref.unet_forward(tiny_unets[name], *inputs)
    model, params = pretrained.load_unet(tiny_unet_dirs[name], dtype=jnp.bfloat16, progress=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # fp32 master weights
    got = jax.jit(model.apply)({"params": params}, *map(jnp.asarray, inputs))
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got, np.float32), want) <= BF16_TOL


def _torch_down_features(tm, sample, timestep, context, ids):
    """Replicates diffusers' forward up to the down blocks (the SF-V discriminator backbone)."""
    b, f = sample.shape[:2]
    with torch.no_grad():
        t = torch.from_numpy(timestep)
        emb = tm.time_embedding(tm.time_proj(t))
        aug = tm.add_embedding(tm.add_time_proj(torch.from_numpy(ids).flatten()).reshape(b, -1))
        emb = (emb + aug).repeat_interleave(f, dim=0)
        ehs = torch.from_numpy(context).repeat_interleave(f, dim=0)
        h = tm.conv_in(video_to_torch(sample))
        indicator = torch.zeros(b, f)
        feats = []
        for block in tm.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, emb, ehs, indicator)
            else:
                h, _ = block(h, emb, indicator)
            feats.append(video_from_torch(h, b))
    return feats


@pytest.mark.parametrize("name", NAMES)
def test_encoder_half_matches_diffusers_down_path(name, tiny_unets, loaded):
    cfg = presets.UNETS[name]
    inputs = ref.unet_inputs(cfg, *presets.UNET_TEST_SHAPES[name], seed=4)
    want = _torch_down_features(tiny_unets[name], *inputs)
    model, params = loaded[name]
    got = jax.jit(lambda p, *a: model.apply(p, *a, method=model.encode))({"params": params}, *map(jnp.asarray, inputs))
    assert len(got) == len(cfg["block_out_channels"])
    for g, w in zip(got, want):
        assert rel_err(g, w) <= PARITY_TOL


def test_encoder_uses_only_encoder_parameters(loaded):
    """The discriminator backbone needs only embeddings, conv_in and down blocks."""
    model, params = loaded["tiny_a"]
    inputs = ref.unet_inputs(presets.UNETS["tiny_a"], *presets.UNET_TEST_SHAPES["tiny_a"])
    keep = {"time_embedding", "add_embedding", "conv_in"} | {k for k in params if k.startswith("down_blocks")}
    enc = {k: v for k, v in params.items() if k in keep}
    encode = jax.jit(lambda p, *a: model.apply(p, *a, method=model.encode))
    full = encode({"params": params}, *map(jnp.asarray, inputs))
    part = encode({"params": enc}, *map(jnp.asarray, inputs))
    for a, b in zip(full, part):
        np.testing.assert_array_equal(a, b)
