"""Cheap video metrics beside FVD, for the toy world's synthetic moving shapes (numpy, float64).

Every function takes uint8 videos [N, T, H, W, 3] (what the pipeline and the datasets give) and returns
one float. Each catches a failure FVD reports only as "worse":

    motion(videos)            mean |frame t+1 - frame t|: 0 for a generator that copies its conditioning frame
    sharpness(videos)         mean squared Laplacian: high-frequency energy, low for blurry (1-step) samples
    colourfulness(videos)     Hasler & Suesstrunk's colourfulness of the last frame: low for greyish, washed-out
                              frames (one-step samples whose colour drains over the clip)
    psnr(a, b)                10 log10(255^2 / MSE), the VAE's reconstruction and frame-0 fidelity
    frame0_fidelity(v, imgs)  PSNR of each video's first frame against its conditioning image

Compare generated videos with real clips of the same size as ratios (``motion(gen) / motion(real)``):
1 is the real data's value.
"""

from __future__ import annotations

import numpy as np


def _check(videos: np.ndarray, what: str = "videos") -> np.ndarray:
    v = np.asarray(videos)
    if v.ndim != 5 or v.shape[-1] != 3 or v.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 [N, T, H, W, 3], got {v.dtype} {v.shape}")
    return v.astype(np.float64)


def motion(videos: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames, in [0, 255] units."""
    v = _check(videos)
    if v.shape[1] < 2:
        raise ValueError(f"videos: motion needs >= 2 frames, got {v.shape[1]}")
    return float(np.mean(np.abs(np.diff(v, axis=1))))


def sharpness(videos: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian over the frames' interiors (grey level), in [0, 255] units."""
    g = _check(videos).mean(axis=-1)
    lap = 4 * g[..., 1:-1, 1:-1] - g[..., :-2, 1:-1] - g[..., 2:, 1:-1] - g[..., 1:-1, :-2] - g[..., 1:-1, 2:]
    return float(np.mean(lap * lap))


def colourfulness(videos: np.ndarray, frame: int = -1) -> float:
    """Hasler & Suesstrunk's colourfulness (2003) of one frame of every video, averaged: with rg = R - G and
    yb = (R + G) / 2 - B per pixel, sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2) per frame,
    in [0, 255] units; 0 for grey frames. The last frame by default: the one furthest from the conditioning
    frame, where a sampler that loses colour has lost the most."""
    v = _check(videos)[:, frame]
    r, g, b = v[..., 0], v[..., 1], v[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2)
    level = np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2)
    return float(np.mean(spread + 0.3 * level))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape (inf when equal)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr: needs two uint8 arrays of one shape, got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def frame0_fidelity(videos: np.ndarray, images: np.ndarray) -> float:
    """PSNR of the videos' first frames [N, H, W, 3] against the conditioning images."""
    v = np.asarray(videos)
    _check(v)
    return psnr(v[:, 0], np.asarray(images))
