"""sfv_jax.diffusion.conditioning against the real diffusers / transformers preprocessing (CPU, fp32)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,
)
from diffusers.video_processor import VideoProcessor

from sfv_jax.diffusion import conditioning as cond

RESIZE_TOL = 1e-5
VAE_TOL = 1e-6


def _torch_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    return _resize_with_antialiasing(t, size)[0].numpy().transpose(1, 2, 0)


def _random_pil(h: int, w: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "in_hw, size",
    [
        ((576, 1024), (224, 224)),  # SVD default -> CLIP
        ((300, 417), (224, 224)),  # mild, odd downscale
        ((333, 97), (61, 45)),  # odd sizes, factor 5.5 / 2.2
        ((100, 150), (224, 224)),  # upscale: sigma 0.001
        ((224, 224), (224, 224)),  # same size
        ((2, 7), (1, 3)),  # tiny: reflect padding at its limit, single-row output
        ((40, 30), (40, 9)),  # identity rows, heavy column blur
    ],
)
def test_resize_matches_diffusers(in_hw, size):
    x = np.random.default_rng(sum(in_hw) + sum(size)).standard_normal((*in_hw, 3)).astype(np.float32)
    got = cond.resize_with_antialiasing(x, size)
    want = _torch_resize(x, size)
    assert got.dtype == np.float32 and got.shape == want.shape == (*size, 3)
    err = float(np.abs(got - want).max())
    print(f"resize {in_hw}->{size}: max abs err {err:.3g}")
    assert err <= RESIZE_TOL


def test_resize_one_pixel_dimension_raises_like_torch():
    x = np.zeros((1, 50, 3), np.float32)
    with pytest.raises(RuntimeError):  # PyTorch's reflect padding refuses pad >= dim
        _torch_resize(x, (4, 25))
    with pytest.raises(cond.ImageError, match="height 1 is too small"):
        cond.resize_with_antialiasing(x, (4, 25))


def _diffusers_clip_chain(image: PIL.Image.Image) -> np.ndarray:
    """The preprocessing lines of StableVideoDiffusionPipeline._encode_image, then the feature extractor."""
    from transformers import CLIPImageProcessor

    vp = VideoProcessor(vae_scale_factor=8)
    x = vp.numpy_to_pt(vp.pil_to_numpy(image))
    x = x * 2.0 - 1.0
    x = _resize_with_antialiasing(x, (224, 224))
    x = (x + 1.0) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = CLIPImageProcessor(image_mean=list(cond.CLIP_MEAN), image_std=list(cond.CLIP_STD))
    px = fe(
        images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    ).pixel_values
    return px[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("hw", [(576, 1024), (181, 243)])
def test_clip_pixels_matches_diffusers(hw):
    image = _random_pil(*hw, seed=hw[0])
    got = cond.clip_pixels(image)
    want = _diffusers_clip_chain(image)
    assert got.dtype == np.float32 and got.shape == want.shape == (224, 224, 3)
    err = float(np.abs(got - want).max())
    print(f"clip_pixels {hw}: max abs err {err:.3g}")
    assert err <= RESIZE_TOL


def test_clip_normalization(tmp_path):
    assert cond.clip_normalization(tmp_path) == (cond.CLIP_MEAN, cond.CLIP_STD)
    (tmp_path / "feature_extractor").mkdir()
    cfg = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}
    (tmp_path / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(cfg))
    mean, std = cond.clip_normalization(tmp_path)
    assert mean == (0.5, 0.5, 0.5) and std == (0.25, 0.5, 1.0)
    out = cond.clip_pixels(_random_pil(64, 64, seed=0), mean=mean, std=std)
    base = cond.clip_pixels(_random_pil(64, 64, seed=0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(out, (base - 0.5) / np.array(std, np.float32), atol=1e-6)


@pytest.mark.parametrize("in_hw, out_hw", [((300, 417), (576, 1024)), ((123, 77), (64, 40)), ((64, 96), (64, 96))])
def test_vae_pixels_matches_video_processor(in_hw, out_hw):
    image = _random_pil(*in_hw, seed=in_hw[1])
    got = cond.vae_pixels(image, *out_hw)
    want = VideoProcessor(vae_scale_factor=8).preprocess(image, height=out_hw[0], width=out_hw[1])
    want = want[0].numpy().transpose(1, 2, 0)
    assert got.dtype == np.float32 and got.shape == want.shape == (*out_hw, 3)
    err = float(np.abs(got - want).max())
    print(f"vae_pixels {in_hw}->{out_hw}: max abs err {err:.3g}")
    assert err <= VAE_TOL
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_vae_pixels_floors_sizes_like_diffusers():
    image = _random_pil(50, 70, seed=1)
    got = cond.vae_pixels(image, 45, 67)
    want = VideoProcessor(vae_scale_factor=8).preprocess(image, height=45, width=67)[0].numpy().transpose(1, 2, 0)
    assert got.shape == want.shape == (40, 64, 3)
    assert np.array_equal(got, want)


# ------------------------------------------------------------------------------------------------ load_image


def test_load_image_sources(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    PIL.Image.fromarray(rgb).save(path)
    for src in (path, str(path), PIL.Image.fromarray(rgb), rgb):
        im = cond.load_image(src)
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)

    rgba = np.concatenate([rgb, np.full((9, 13, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(np.asarray(cond.load_image(rgba)), rgb)  # alpha dropped, like PIL convert("RGB")
    assert np.array_equal(np.asarray(cond.load_image(PIL.Image.fromarray(rgba))), rgb)
    gray = rgb[..., 0]
    for src in (gray, PIL.Image.fromarray(gray)):
        assert np.array_equal(np.asarray(cond.load_image(src)), np.repeat(gray[..., None], 3, axis=-1))


def test_load_image_missing_file(tmp_path):
    with pytest.raises(cond.ImageError, match=r"not found.*nope\.png"):
        cond.load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("payload", [b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_load_image_corrupt_file(tmp_path, payload):
    path = tmp_path / "broken.png"
    path.write_bytes(payload)
    with pytest.raises(cond.ImageError, match=r"cannot read image file.*broken\.png"):
        cond.load_image(path)


def test_load_image_truncated_file(tmp_path):
    path = tmp_path / "cut.jpg"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(cond.ImageError, match=r"cut\.jpg"):
        cond.load_image(path)


@pytest.mark.parametrize(
    "array, pattern",
    [
        (np.zeros((8, 8, 3), np.float32), r"float32.*uint8.*PIL"),
        (np.zeros((8, 8, 3), np.int64), r"int64.*uint8"),
        (np.zeros((8, 8, 2), np.uint8), r"\(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"\(2, 8, 8, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), r"empty.*\(0, 8, 3\)"),
    ],
)
def test_load_image_bad_arrays(array, pattern):
    with pytest.raises(cond.ImageError, match=pattern):
        cond.load_image(array)


def test_load_image_empty_pil_and_bad_type():
    with pytest.raises(cond.ImageError, match="empty"):
        cond.load_image(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(cond.ImageError, match="list"):
        cond.load_image([1, 2, 3])


def test_check_size():
    cond.check_size(576, 1024)
    cond.check_size(8, 8)
    with pytest.raises(cond.ImageError, match=r"height=575.*multiples of 8"):
        cond.check_size(575, 1024)
    with pytest.raises(cond.ImageError, match=r"height=0, width=-8"):
        cond.check_size(0, -8)
    with pytest.raises(cond.ImageError, match=r"width=1020"):
        cond.check_size(576, 1020)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (mode I / I;16) becomes 8-bit grey by value / 257 (PIL's convert("RGB")
    would clip everything above 255 to white)."""
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(ramp).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode.startswith("I")  # how Pillow opens it
    got = np.asarray(cond.load_image(path))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    with pytest.raises(cond.ImageError, match="floating-point image"):
        cond.load_image(PIL.Image.fromarray(np.zeros((4, 4), np.float32)))
