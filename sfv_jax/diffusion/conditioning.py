"""Image -> conditioning inputs of the SVD image-to-video pipeline (numpy + PIL, channels-last).

This module owns everything between a user image and the two tensors the model is conditioned on:

* ``clip_pixels``: the CLIP image-encoder input, mirroring the preprocessing lines of diffusers'
  ``StableVideoDiffusionPipeline._encode_image`` (``pil_to_numpy`` -> ``*2-1`` -> ``_resize_with_antialiasing`` to
  224x224 -> ``(x+1)/2`` -> ``CLIPImageProcessor`` normalize with resize / center-crop / rescale off).
* ``vae_pixels``: the VAE encoder input, mirroring ``VideoProcessor.preprocess(image, height=, width=)`` for a PIL
  image (``VaeImageProcessor``: sizes floored to multiples of ``vae_scale_factor``, PIL LANCZOS resize, ``/255``,
  ``*2-1``), which the pipeline then hands to ``_encode_vae_image``.
* ``resize_with_antialiasing``: diffusers' ``_resize_with_antialiasing`` (with its helpers ``_compute_padding``,
  ``_filter2d``, ``_gaussian``, ``_gaussian_blur2d``) followed by PyTorch's bicubic ``align_corners=True``
  interpolation, written as two separable linear maps.
* ``load_image`` / ``check_size``: input validation with clear ``ImageError`` messages.

No torch here: the functions are pure numpy / PIL and are tested against the real diffusers / transformers code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
_CUBIC_A = -0.75  # PyTorch's bicubic convolution coefficient
# the largest image file read (8192 x 8192): below PIL's decompression-bomb limit, far above any video size;
# a small file can declare a huge size, so the header is checked before the pixels are decoded
MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """A user image (or requested size) that cannot be turned into conditioning inputs."""


def load_image(image: str | os.PathLike | PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    """Load ``image`` as an RGB PIL image (files like ``diffusers.utils.load_image``: EXIF orientation applied).

    Accepts a file path, a PIL image of any mode (converted with ``convert("RGB")``; alpha is dropped, not
    composited; 16-bit grey scaled to 8 bits, see :func:`to_rgb`), or a uint8 numpy array of shape [H, W]
    (gray), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).
    Raises ``ImageError`` naming the file / shape / dtype on a missing or unreadable file, a non-uint8 array, a wrong
    shape, or an empty image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {str(path)!r}")
        try:
            with PIL.Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:  # the header's size, before any pixel is decoded
                    raise ImageError(
                        f"image file {str(path)!r} declares {im.width}x{im.height} pixels, more than the "
                        f"{MAX_PIXELS:,} this reads (it is resized to the video's size anyway): resize it first"
                    )
                im.load()
                pil = to_rgb(PIL.ImageOps.exif_transpose(im))
        except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError) as e:
            raise ImageError(f"cannot read image file {str(path)!r} (not an image or corrupt): {e}") from e
    elif isinstance(image, PIL.Image.Image):
        pil = to_rgb(image)  # as given: diffusers' pipeline does not re-orient PIL inputs
    elif isinstance(image, np.ndarray):
        pil = _array_to_pil(image)
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}; pass a file path, a PIL image or a uint8 numpy array"
        )
    if pil.width == 0 or pil.height == 0:
        raise ImageError(f"empty image: size {pil.width}x{pil.height} (width x height)")
    return pil


def to_rgb(pil: PIL.Image.Image) -> PIL.Image.Image:
    """``pil.convert("RGB")``, except for high-bit-depth grey images (16-bit PNGs open as mode "I" or
    "I;16"), whose ``convert`` clips every value above 255 to white: they are scaled to 8 bits
    (65535 -> 255) first. Float images ("F") are refused (their range is unknown)."""
    if pil.mode == "F":
        raise ImageError("a floating-point image (mode F): save it as an 8- or 16-bit image")
    if pil.mode.startswith("I"):
        a = np.asarray(pil).astype(np.int64)
        if pil.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = np.rint(np.clip(a, 0, 65535) / 257.0)
        return PIL.Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    return pil.convert("RGB")


def _array_to_pil(a: np.ndarray) -> PIL.Image.Image:
    if a.dtype != np.uint8:
        hint = (
            " (float arrays are ambiguous: pass uint8 values in 0..255 or a PIL image)"
            if np.issubdtype(a.dtype, np.floating)
            else " (pass uint8 values in 0..255 or a PIL image)"
        )
        raise ImageError(f"image array has dtype {a.dtype}, expected uint8{hint}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"image array has shape {a.shape}; expected (H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
    if a.size == 0:
        raise ImageError(f"empty image array of shape {a.shape}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return PIL.Image.fromarray(np.ascontiguousarray(a), mode=mode).convert("RGB")


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """Raise ``ImageError`` unless ``height`` and ``width`` are positive multiples of ``multiple`` (VAE: 8)."""
    bad = [
        f"{name}={v}"
        for name, v in (("height", height), ("width", width))
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0 or v % multiple
    ]
    if bad:
        raise ImageError(
            f"{', '.join(bad)}: height and width must be positive multiples of {multiple} "
            f"(the VAE downsamples by {multiple}); e.g. --height 576 --width 1024"
        )


# ----------------------------------------------------------------------------------------------------------------
# _resize_with_antialiasing as separable linear maps
# ----------------------------------------------------------------------------------------------------------------


def _gaussian_taps(ks: int, sigma: float) -> np.ndarray:
    """diffusers ``_gaussian(ks, sigma)``: normalized taps at ``arange(ks) - ks // 2``, computed in float32."""
    s = np.float32(sigma)
    x = np.arange(ks, dtype=np.float32) - np.float32(ks // 2)
    if ks % 2 == 0:  # never reached from _resize_with_antialiasing (kernel sizes are made odd), kept for fidelity
        x = x + np.float32(0.5)
    g = np.exp(-(x * x) / (np.float32(2) * (s * s)))
    return g / g.sum(dtype=np.float32)


def _blur_matrix(n: int, ks: int, sigma: float, axis: str) -> np.ndarray:
    """(n, n) float64 matrix of ``_filter2d`` along one axis: reflect padding (front ``(ks-1)//2``), correlation."""
    front = (ks - 1) // 2
    rear = ks - 1 - front
    if max(front, rear) >= n:
        raise ImageError(
            f"image {axis} {n} is too small for the anti-aliasing blur (kernel size {ks} needs reflect padding "
            f"{max(front, rear)} < {n}); PyTorch's reflect padding would fail here"
        )
    taps = _gaussian_taps(ks, sigma).astype(np.float64)
    src = np.arange(n)[:, None] + np.arange(ks)[None, :] - front  # padded index -> source index, [n, ks]
    src = np.where(src < 0, -src, src)
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    m = np.zeros((n, n), np.float64)
    np.add.at(m, (np.repeat(np.arange(n), ks), src.ravel()), np.tile(taps, n))
    return m


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """PyTorch ``get_cubic_upsample_coefficients`` (A = -0.75) for fractional offsets ``t`` -> [..., 4]."""
    a = _CUBIC_A

    def cc1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def cc2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of ``F.interpolate(mode="bicubic", align_corners=True)`` along one axis."""
    # area_pixel_compute_scale / area_pixel_compute_source_index in float32 (opmath of a float32 input): computing
    # the source positions in float64 instead shifts them by ~1e-5 px and costs up to ~1e-4 on unit-variance noise.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    real = scale * np.arange(n_out, dtype=np.float32)
    idx = np.minimum(np.floor(real).astype(np.int64), n_in - 1)  # guard_index_and_lambda
    t = np.clip(real - idx.astype(np.float32), 0, 1).astype(np.float64)
    w = _cubic_weights(t)
    cols = np.clip(idx[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)  # border indices clamped
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), cols.ravel()), w.ravel())
    return m


def _resize_matrices(in_hw: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (h, H0) and (w, W0) matrices of blur-then-bicubic, as in diffusers ``_resize_with_antialiasing``."""
    mats = []
    for n_in, n_out, axis in zip(in_hw, size, ("height", "width")):
        sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
        ks = int(max(2.0 * 2 * sigma, 3))
        ks += 1 - ks % 2  # make it odd
        mats.append(_bicubic_matrix(n_in, n_out) @ _blur_matrix(n_in, ks, sigma, axis))
    return mats[0], mats[1]


def resize_with_antialiasing(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """diffusers ``_resize_with_antialiasing(x, size)`` on a channels-last image.

    x: float [H0, W0, C] (any value range); size: (h, w). Returns float32 [h, w, C].
    Gaussian blur (sigma_i = max((H0_i / h_i - 1) / 2, 0.001), odd kernel size ``int(max(4 sigma_i, 3))``, reflect
    padding) then bicubic interpolation with ``align_corners=True`` (A = -0.75, clamped borders, no antialias), both
    applied as float64 separable matrices: ``out = Mh @ x @ Mw^T`` per channel.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ImageError(f"expected a channels-last image [H, W, C], got shape {x.shape}")
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ImageError(f"cannot resize an image of shape {x.shape} to {(h, w)}: sizes must be positive")
    mh, mw = _resize_matrices(x.shape[:2], (h, w))
    out = np.einsum("ij,jkc,lk->ilc", mh, x.astype(np.float64), mw, optimize=True)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# CLIP and VAE inputs
# ----------------------------------------------------------------------------------------------------------------


def _pil_to_float(image: PIL.Image.Image) -> np.ndarray:
    """``VaeImageProcessor.pil_to_numpy``: float32 [H, W, 3] in [0, 1] (``np.array(img).astype(float32) / 255``)."""
    if not isinstance(image, PIL.Image.Image):
        raise ImageError(f"expected a PIL image (see load_image), got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image).astype(np.float32) / np.float32(255.0)


def clip_normalization(folder: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from ``folder/feature_extractor/preprocessor_config.json`` of an SVD pipeline folder.

    Falls back to ``(CLIP_MEAN, CLIP_STD)`` when the file (or a key) is absent.
    """
    cfg_path = Path(folder) / "feature_extractor" / "preprocessor_config.json"
    if not cfg_path.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read CLIP preprocessor config {str(cfg_path)!r}: {e}") from e
    out = []
    for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        v = cfg.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) else v
        if not isinstance(v, list | tuple) or len(v) != 3:
            raise ValueError(f"{str(cfg_path)!r}: {key} must be 3 numbers, got {v!r}")
        out.append(tuple(float(c) for c in v))
    return out[0], out[1]


def clip_pixels(
    image: PIL.Image.Image,
    size: int = CLIP_SIZE,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> np.ndarray:
    """CLIP image-encoder input of ``_encode_image`` for a PIL image: float32 [size, size, 3].

    ``x / 255 -> x * 2 - 1 -> resize_with_antialiasing((size, size)) -> (x + 1) / 2 -> (x - mean) / std``, the
    normalization in float32 like transformers' ``normalize`` (mean / std cast to the image dtype).
    """
    x = _pil_to_float(image) * np.float32(2.0) - np.float32(1.0)
    x = resize_with_antialiasing(x, (size, size))
    x = (x + np.float32(1.0)) / np.float32(2.0)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def vae_pixels(image: PIL.Image.Image, height: int, width: int, vae_scale_factor: int = 8) -> np.ndarray:
    """VAE encoder input: ``VideoProcessor(vae_scale_factor).preprocess(image, height=, width=)`` channels-last.

    image: PIL image (converted to RGB first; diffusers would keep other modes). Returns float32 [h, w, 3] in
    [-1, 1] where h, w are ``height``, ``width`` floored to multiples of ``vae_scale_factor`` (as diffusers'
    ``get_default_height_width`` does silently; call ``check_size`` first to reject such sizes). The image is
    resized with PIL LANCZOS to (w, h) unless it already has that size, then ``x / 255 * 2 - 1`` in float32.
    """
    if not isinstance(image, PIL.Image.Image):
        raise ImageError(f"expected a PIL image (see load_image), got {type(image).__name__}")
    h, w = (int(v) - int(v) % vae_scale_factor for v in (height, width))
    if h <= 0 or w <= 0:
        raise ImageError(f"height={height}, width={width} floor to {h}x{w} at multiples of {vae_scale_factor}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((w, h), resample=PIL.Image.Resampling.LANCZOS, reducing_gap=None)
    return np.float32(2.0) * _pil_to_float(image) - np.float32(1.0)
