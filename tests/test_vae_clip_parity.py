"""VAE (encode, chunked temporal decode) and CLIP image encoder against diffusers / transformers, fp32,
weights through our converter; conversion of whole SVD folders and the exact round trip back."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from conftest import PARITY_TOL, flax_params_from_torch, rel_err

from sfv_jax.checkpoint import convert, pretrained
from sfv_jax.models import presets
from sfv_jax.models.vae import decode_latents
from sfv_jax.testing import torch_reference as ref


@pytest.fixture(scope="module")
def vae_pair():
    tv = ref.build_vae(seed=3)
    model = pretrained.vae_from_config(presets.VAES["tiny"])
    params = flax_params_from_torch(tv, model, *pretrained.init_args(model))
    return tv, model, params


@pytest.fixture(scope="module")
def clip_pair():
    tc = ref.build_image_encoder(seed=4)
    model = pretrained.image_encoder_from_config(presets.IMAGE_ENCODERS["tiny"])
    params = flax_params_from_torch(tc, model, *pretrained.init_args(model))
    return tc, model, params


def test_vae_encode_matches_diffusers(vae_pair):
    tv, model, params = vae_pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, 40, 48, 3)).astype(np.float32)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_moments))(params, x)
    with torch.no_grad():
        dist = tv.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    assert rel_err(mean, dist.mode().numpy().transpose(0, 2, 3, 1)) <= PARITY_TOL
    assert rel_err(logvar, dist.logvar.numpy().transpose(0, 2, 3, 1)) <= PARITY_TOL


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_vae_chunked_decode_matches_diffusers(vae_pair, chunk):
    """decode_latents == diffusers' pipeline decode_latents, chunk by chunk (frames mix only inside a chunk)."""
    tv, model, params = vae_pair
    b, f = 2, 5
    z = np.random.default_rng(1).standard_normal((b, f, 10, 12, 4)).astype(np.float32)
    got = jax.jit(lambda p, z: decode_latents(model, p, z, chunk))(params, z)
    rows = torch.from_numpy(z.transpose(0, 1, 4, 2, 3).copy()).flatten(0, 1) / presets.VAES["tiny"]["scaling_factor"]
    c = chunk or f
    with torch.no_grad():
        want = torch.cat(
            [tv.decode(rows[i : i + c], num_frames=rows[i : i + c].shape[0]).sample for i in range(0, b * f, c)]
        )
    want = want.numpy().transpose(0, 2, 3, 1).reshape(b, f, 40, 48, 3)
    assert rel_err(got, want) <= PARITY_TOL


def test_decode_chunking_changes_the_result(vae_pair):
    """Guard against a decoder that ignores the temporal mixing: chunk sizes must matter."""
    _, model, params = vae_pair
    z = np.random.default_rng(2).standard_normal((1, 4, 6, 6, 4)).astype(np.float32)
    dec = jax.jit(lambda p, z, c: decode_latents(model, p, z, c), static_argnums=2)
    assert rel_err(dec(params, z, 1), dec(params, z, 4)) > 1e-3


def test_clip_image_embeds_match_transformers(clip_pair):
    tc, model, params = clip_pair
    px = np.random.default_rng(3).standard_normal((2, 224, 224, 3)).astype(np.float32)
    got = jax.jit(model.apply)({"params": params}, px)
    with torch.no_grad():
        want = tc(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    assert got.shape == (2, presets.IMAGE_ENCODERS["tiny"]["projection_dim"])
    assert rel_err(got, want) <= PARITY_TOL


def test_whole_folder_round_trip_is_exact(tiny_pipeline_dirs, tmp_path):
    """diffusers SVD folder -> converted (one call) -> exported: every tensor bit-exact; the exported
    folder loads in diffusers / transformers and computes the same."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionModelWithProjection

    from sfv_jax.checkpoint.safetensors_io import open_weights

    pipe, src, converted = tiny_pipeline_dirs
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        ["feature_extractor", "image_encoder", "model_index.json", "scheduler", "sfv_jax.json", "unet", "vae"]
    )
    assert json.loads((converted / "sfv_jax.json").read_text())["component"] == "pipeline"
    exported = convert.export_folder(converted, tmp_path / "exported")
    for sub, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("image_encoder", "model"),
    ):
        a, b = open_weights(src / sub, stem), open_weights(exported / sub, stem)
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{sub}: {k}"
    vae = ref.load_aligned(AutoencoderKLTemporalDecoder, exported / "vae")
    clip = ref.load_aligned(CLIPVisionModelWithProjection, exported / "image_encoder")
    x = torch.randn(1, 3, 16, 16)
    px = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, pipe.vae.encode(x).latent_dist.mean)
        assert torch.equal(clip(pixel_values=px).image_embeds, pipe.image_encoder(pixel_values=px).image_embeds)


def test_component_conversion_is_detected_from_config(tiny_pipeline_dirs, tmp_path):
    _, src, _ = tiny_pipeline_dirs
    out = convert.convert_folder(src / "image_encoder", tmp_path / "clip", progress=False)
    assert json.loads((out / "sfv_jax.json").read_text())["component"] == "image_encoder"
    model, params = pretrained.load_image_encoder(out)
    assert model.config.projection_dim == presets.IMAGE_ENCODERS["tiny"]["projection_dim"]
    vae, _ = pretrained.load_vae(src, progress=False)  # the vae/ subfolder of a diffusers SVD folder
    assert vae.config.block_out_channels == tuple(presets.VAES["tiny"]["block_out_channels"])
