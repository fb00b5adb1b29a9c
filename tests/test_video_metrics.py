"""The cheap video metrics (motion, sharpness, colourfulness, PSNR) and the frame grids of the reports."""

from __future__ import annotations

import numpy as np
import pytest

from sfv_jax.data import video_io, video_metrics


def test_video_metrics():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    still = np.repeat(video[:, :1], 5, axis=1)
    assert video_metrics.motion(still) == 0.0
    assert video_metrics.motion(video) == pytest.approx(np.abs(np.diff(video.astype(float), axis=1)).mean())
    blurred = ((video.astype(np.float64) + np.roll(video, 1, 2) + np.roll(video, 1, 3)) / 3).astype(np.uint8)
    assert video_metrics.sharpness(blurred) < 0.5 * video_metrics.sharpness(video)
    assert video_metrics.psnr(video, video) == float("inf")
    noisy = np.clip(video.astype(int) + 5 * (rng.integers(0, 2, video.shape) * 2 - 1), 0, 255).astype(np.uint8)
    mse = np.mean((noisy.astype(float) - video) ** 2)
    assert video_metrics.psnr(noisy, video) == pytest.approx(10 * np.log10(255**2 / mse))
    assert video_metrics.frame0_fidelity(video, video[:, 0]) == float("inf")
    with pytest.raises(ValueError, match=r"uint8 \[N, T, H, W, 3\]"):
        video_metrics.motion(video[0])
    with pytest.raises(ValueError, match="one shape"):
        video_metrics.psnr(video, video[:1])


def test_colourfulness_is_zero_for_grey_and_drops_as_colour_drains():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8)
    grey = np.repeat(video.mean(axis=-1, keepdims=True), 3, axis=-1).round().astype(np.uint8)
    assert video_metrics.colourfulness(grey) == 0.0
    washed = (0.5 * video + 0.5 * grey).round().astype(np.uint8)  # half the way to grey
    assert video_metrics.colourfulness(washed) == pytest.approx(0.5 * video_metrics.colourfulness(video), rel=0.02)
    # the last frame only by default: a video whose earlier frames are grey keeps its last frame's figure
    early_grey = np.concatenate([grey[:, :-1], video[:, -1:]], axis=1)
    assert video_metrics.colourfulness(early_grey) == video_metrics.colourfulness(video)
    v = video[0, -1].astype(np.float64)
    rg, yb = v[..., 0] - v[..., 1], 0.5 * (v[..., 0] + v[..., 1]) - v[..., 2]
    one = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    assert video_metrics.colourfulness(video[:1]) == pytest.approx(one)


def test_frame_grid(tmp_path):
    a = np.zeros((3, 4, 5, 3), np.uint8)
    b = np.full((3, 4, 5, 3), 1.0, np.float32)
    grid = video_io.frame_grid([a, b], gap=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
    assert grid[:4, :5].max() == 0 and grid[5:, :5].min() == 255 and grid[4].min() == 255
    path = video_io.write_video(tmp_path / "g.png", grid[None])
    assert video_io.read_video(path)[0].shape == (1, *grid.shape)
    with pytest.raises(video_io.VideoError, match="one shape"):
        video_io.frame_grid([a, a[:2]])
