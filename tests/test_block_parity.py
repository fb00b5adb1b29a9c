"""Per-block parity with diffusers: each block type of the UNet, weights through the converter, fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_TOL, flax_params_from_torch, rel_err, video_from_torch, video_to_torch
from diffusers.models.embeddings import get_timestep_embedding

from sfv_jax.models import presets
from sfv_jax.models import unet as U
from sfv_jax.models.attention import BasicTransformerBlock, TransformerSpatioTemporal
from sfv_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from sfv_jax.models.resnet import Downsample2D, SpatioTemporalResBlock, Upsample2D

B, F, H, W = 2, 3, 6, 5
rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def tm(tiny_unets):
    return tiny_unets["tiny_b"]


@pytest.fixture(scope="module")
def cfg():
    return U.UNetConfig.from_diffusers(presets.UNETS["tiny_b"])


def run_flax(module, torch_module, *inputs):
    params = flax_params_from_torch(torch_module, module, *inputs)
    return jax.jit(module.apply)({"params": params}, *inputs)


def test_timestep_sinusoid_matches_diffusers():
    t = np.array([0.0, -1.55, 1.63777, 3.0, 127.0, 13.0], np.float32)
    for dim in (8, 256, 320, 33):
        want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
        # float32 sin/cos of arguments up to ~127 rad: one ulp of the argument is ~8e-6
        assert rel_err(timestep_embedding(jnp.asarray(t), dim), want) <= PARITY_TOL


def test_timestep_embedding_mlp(tm):
    x = rand(4, 32)
    with torch.no_grad():
        want = tm.time_embedding(torch.from_numpy(x)).numpy()
    got = run_flax(TimestepEmbedding(128, 128), tm.time_embedding, x)
    assert rel_err(got, want) <= PARITY_TOL


@pytest.mark.parametrize(
    "where",
    [
        "down_blocks.0.resnets.0",
        "down_blocks.1.resnets.0",
        "down_blocks.2.resnets.1",
        "mid_block.resnets.0",
        "up_blocks.1.resnets.2",
    ],
)
def test_spatio_temporal_res_block(tm, where):
    block = tm.get_submodule(where)
    cin, cout = block.spatial_res_block.in_channels, block.spatial_res_block.out_channels
    eps = block.spatial_res_block.norm1.eps
    x, temb = rand(B, F, H, W, cin), rand(B, 128)
    with torch.no_grad():
        want = block(video_to_torch(x), torch.from_numpy(temb).repeat_interleave(F, 0), torch.zeros(B, F))
    got = run_flax(SpatioTemporalResBlock(cout, eps), block, x, temb)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


@pytest.mark.parametrize(
    "where", ["down_blocks.0.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0"]
)
def test_transformer_spatio_temporal(tm, where):
    block = tm.get_submodule(where)
    c, heads, layers = block.in_channels, block.num_attention_heads, len(block.transformer_blocks)
    x, ctx = rand(B, F, H, W, c), rand(B, 1, 48)
    with torch.no_grad():
        want = block(
            video_to_torch(x), torch.from_numpy(ctx).repeat_interleave(F, 0), torch.zeros(B, F), return_dict=False
        )[0]
    got = run_flax(TransformerSpatioTemporal(heads, layers), block, x, ctx)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


def test_basic_transformer_block(tm):
    block = tm.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0")
    x, ctx = rand(B * F, H * W, 64), rand(B * F, 1, 48)
    with torch.no_grad():
        want = block(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
    got = run_flax(BasicTransformerBlock(2, 32), block, x, ctx)
    assert rel_err(got, want) <= PARITY_TOL


def test_temporal_basic_transformer_block(tm):
    block = tm.get_submodule("down_blocks.1.attentions.0.temporal_transformer_blocks.0")
    s = H * W
    x, ctx = rand(B, F, s, 64), rand(B, 1, 48)
    with torch.no_grad():
        time_ctx = torch.from_numpy(ctx)[:, None].expand(B, s, 1, 48).reshape(B * s, 1, 48)
        want = block(torch.from_numpy(x.reshape(B * F, s, 64)), F, encoder_hidden_states=time_ctx)
    # Flax takes the sequence axis (frames) second to last: [B, S, F, C]; context broadcasts over S.
    got = run_flax(BasicTransformerBlock(2, 32, temporal=True), block, x.transpose(0, 2, 1, 3), ctx[:, None])
    assert rel_err(np.asarray(got).transpose(0, 2, 1, 3), want.numpy().reshape(B, F, s, 64)) <= PARITY_TOL


def test_downsample(tm):
    block = tm.down_blocks[0].downsamplers[0]
    x = rand(B, F, 7, 6, 32)  # odd size: symmetric padding must give ceil(7/2)
    with torch.no_grad():
        want = block(video_to_torch(x))
    got = run_flax(Downsample2D(32), block, x)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


@pytest.mark.parametrize("size", [None, (7, 5)])
def test_upsample(tm, size):
    block = tm.up_blocks[0].upsamplers[0]
    x = rand(B, F, 4, 3, 96)
    with torch.no_grad():
        want = block(video_to_torch(x), size)
    got = run_flax(Upsample2D(96), block, x, size) if size is None else _run_upsample_sized(block, x, size)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


def _run_upsample_sized(block, x, size):
    module = Upsample2D(96)
    params = flax_params_from_torch(block, module, x)
    return jax.jit(module.apply, static_argnums=2)({"params": params}, x, size)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_down_blocks(tm, cfg, index):
    block = tm.down_blocks[index]
    cin = (32, 32, 64)[index]
    x, temb, ctx = rand(B, F, H, W, cin), rand(B, 128), rand(B, 1, 48)
    with torch.no_grad():
        args = (video_to_torch(x), torch.from_numpy(temb).repeat_interleave(F, 0))
        ehs = torch.from_numpy(ctx).repeat_interleave(F, 0)
        if index < 2:
            want, want_skips = block(*args, ehs, torch.zeros(B, F))
        else:
            want, want_skips = block(*args, torch.zeros(B, F))
    module = U.DownBlock(cfg, index)
    params = flax_params_from_torch(block, module, x, temb, ctx)
    got, skips = jax.jit(module.apply)({"params": params}, x, temb, ctx)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL
    assert len(skips) == len(want_skips)
    for g, w in zip(skips, want_skips):
        assert rel_err(g, video_from_torch(w, B)) <= PARITY_TOL


def test_mid_block(tm, cfg):
    x, temb, ctx = rand(B, F, H, W, 96), rand(B, 128), rand(B, 1, 48)
    with torch.no_grad():
        want = tm.mid_block(
            video_to_torch(x),
            torch.from_numpy(temb).repeat_interleave(F, 0),
            torch.from_numpy(ctx).repeat_interleave(F, 0),
            torch.zeros(B, F),
        )
    got = run_flax(U.MidBlock(cfg, 2), tm.mid_block, x, temb, ctx)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


@pytest.mark.parametrize("index", [0, 1, 2])
def test_up_blocks(tm, cfg, index):
    block = tm.up_blocks[index]
    # (hidden channels, skip channels pushed by the mirrored down path, upsample target)
    hidden, skip_ch, size = {0: (96, (64, 96, 96), (5, 4)), 1: (96, (32, 64, 64), (6, 5)), 2: (64, (32, 32, 32), None)}[
        index
    ]
    hw = (3, 2) if index == 0 else ((5, 4) if index == 1 else (6, 5))
    x, temb, ctx = rand(B, F, *hw, hidden), rand(B, 128), rand(B, 1, 48)
    skips = [rand(B, F, *hw, c) for c in skip_ch]
    with torch.no_grad():
        kwargs = dict(
            temb=torch.from_numpy(temb).repeat_interleave(F, 0),
            image_only_indicator=torch.zeros(B, F),
            upsample_size=size,
        )
        if index > 0:
            kwargs["encoder_hidden_states"] = torch.from_numpy(ctx).repeat_interleave(F, 0)
        want = block(video_to_torch(x), tuple(video_to_torch(s) for s in skips), **kwargs)
    module = U.UpBlock(cfg, index)
    params = flax_params_from_torch(block, module, x, skips, temb, ctx, size)
    got = jax.jit(module.apply, static_argnums=5)({"params": params}, x, skips, temb, ctx, size)
    assert rel_err(got, video_from_torch(want, B)) <= PARITY_TOL


@pytest.mark.parametrize("tokens", [384, 400, 257])  # chunk 128, chunk 100, no divisor -> one block
def test_chunked_attention_matches_torch_sdpa(tokens):
    from sfv_jax.models.attention import dot_product_attention

    q, k, v = (rand(2, tokens, 3, 16) for _ in range(3))
    want = (
        torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)))
        .transpose(1, 2)
        .numpy()
    )
    for impl in ("chunked", "xla"):
        got = jax.jit(lambda a, b, c: dot_product_attention(a, b, c, 16**-0.5, impl))(q, k, v)  # noqa: B023
        assert rel_err(got, want) <= PARITY_TOL, impl


def test_transformer_at_chunked_size(tm):
    """A spatial size whose H*W (20*20 = 400 tokens) takes the chunked attention path."""
    block = tm.get_submodule("down_blocks.0.attentions.0")
    x, ctx = rand(1, 2, 20, 20, 32), rand(1, 1, 48)
    with torch.no_grad():
        want = block(
            video_to_torch(x), torch.from_numpy(ctx).repeat_interleave(2, 0), torch.zeros(1, 2), return_dict=False
        )[0]
    got = run_flax(TransformerSpatioTemporal(block.num_attention_heads, 1, "chunked"), block, x, ctx)
    assert rel_err(got, video_from_torch(want, 1)) <= PARITY_TOL
