"""Clip geometry shared by every dataset kind: frame-rate resampling, resize + centre crop, the random
training window, the motion score and motion bucket. Pure numpy / Pillow / PyAV (no JAX, no TensorFlow),
so dataset-building worker processes import only this.

    frames, info = decode_video("a.mp4", fps=7, height=448, width=768)   # uint8 [T, 448, 768, 3] at 7 fps
    start = window_start(len(frames), 14, np.random.default_rng([seed, position]))

Frame-rate resampling: output frame ``k`` shows at ``t_k = k / fps``; it is the source frame on screen at
that time (the last one whose presentation time is <= ``t_k``), for every ``t_k`` before the end of the
last source frame. A 30 fps clip of 60 frames (2 s) gives 14 frames at 7 fps: source frames
``floor(k * 30 / 7)``; a source slower than the target repeats frames.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sfv_jax.data import video_io

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
JPEG_QUALITY = 95
MOTION_BUCKET_SCALE = 12.0  # a mean change of 1 grey level per frame -> 12 motion buckets


def resample(
    frames: Iterable[tuple[float, float, Any]], fps: float, max_frames: int | None = None
) -> Iterator[tuple[int, Any]]:
    """``(seconds, duration, item)`` in presentation order -> ``(k, item)`` for ``t_k = k / fps``
    (see the module docstring). Streams: holds one item. ``max_frames`` stops after that many outputs."""
    k, prev, end = 0, None, 0.0
    for t, duration, item in frames:
        if prev is not None:
            while k / fps < t - 1e-9 and (max_frames is None or k < max_frames):
                yield k, prev
                k += 1
        if max_frames is not None and k >= max_frames:
            return
        prev, end = item, t + duration
    while prev is not None and k / fps < end - 1e-9 and (max_frames is None or k < max_frames):
        yield k, prev
        k += 1


def resample_indices(num_frames: int, src_fps: float, fps: float) -> np.ndarray:
    """Which of ``num_frames`` uniformly timed source frames (``src_fps``) make the clip at ``fps``."""
    step = 1.0 / src_fps
    return np.asarray([i for _, i in resample(((i * step, step, i) for i in range(num_frames)), fps)], np.int64)


def resize_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> ``[height, width, 3]``: scaled (bicubic, antialiased) to cover the target,
    then centre-cropped; the aspect ratio is kept."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    img = Image.fromarray(frame).resize((sw, sh), Image.BICUBIC, reducing_gap=None)
    top, left = (sh - height) // 2, (sw - width) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def window_start(available: int, num_frames: int, rng: np.random.Generator) -> int:
    """Uniform start of a ``num_frames`` window in ``available`` frames (``available >= num_frames``)."""
    if available < num_frames:
        raise ValueError(f"a clip of {available} frames has no window of {num_frames}")
    return int(rng.integers(0, available - num_frames + 1))


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, in [0, 255] units (0 for a still clip)."""
    f = np.asarray(frames, np.float32)
    return float(np.abs(f[1:] - f[:-1]).mean()) if len(f) > 1 else 0.0


def motion_bucket(score: float, scale: float = MOTION_BUCKET_SCALE) -> int:
    """A motion_bucket_id in [0, 255] from :func:`motion_score` (``data.motion_bucket_id = -1``); a fixed
    config value (SVD's default 127) is used otherwise."""
    return int(np.clip(round(score * scale), 0, 255))


def motion_bucket_ids(fixed: int, scores) -> list[float]:
    """The motion_bucket_id conditioning of clips: ``fixed`` (config ``data.motion_bucket_id``) when >= 0,
    else each clip's :func:`motion_bucket` of its motion score."""
    return [float(fixed if fixed >= 0 else motion_bucket(s)) for s in scores]


NOISE_AUG_KINDS = ("fixed", "lognormal")


def noise_aug_strengths(kind: str, fixed: float, log_mean: float, log_std: float, seed: int, positions) -> np.ndarray:
    """The conditioning frame's noise-augmentation strength of each sample (config ``data.noise_aug``):
    ``fixed`` everywhere, or ``exp(N(log_mean, log_std^2))`` drawn from ``default_rng([seed, 7, position])``
    (SVD fine-tuning scripts: log-mean -3.0, log-std 0.5), so a sample's strength depends on its global
    position only, not on how a step is split. -> float32 [len(positions)]."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    if kind == "fixed":
        return np.full(positions.shape, fixed, np.float32)
    if kind == "lognormal":
        return np.array(
            [np.exp(np.random.default_rng([seed, 7, int(p)]).normal(log_mean, log_std)) for p in positions], np.float32
        )
    raise ValueError(f"noise augmentation {kind!r} is not one of {NOISE_AUG_KINDS}")


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_video(
    path: str | os.PathLike, *, fps: float, height: int, width: int, max_seconds: float | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode, resample to ``fps``, resize and centre-crop: (uint8 ``[T, height, width, 3]``, info).

    ``info``: source ``fps``, ``duration`` (s), source ``src_height``/``src_width``, ``motion_score`` of
    the resampled frames. ``max_seconds`` keeps only the start of long videos. VideoError if unreadable.
    """
    info = video_io.video_info(path)
    limit = None if not max_seconds else max(1, math.floor(max_seconds * fps + 1e-9))
    stream, last = video_io.iter_frames(path), [0.0]

    def timed():
        for t, dt, rgb in stream:
            last[0] = t + dt
            yield t, dt, rgb

    out, cache = [], (None, None)
    for _, rgb in resample(timed(), fps, limit):
        if cache[0] is not rgb:  # a repeated source frame is resized once
            cache = (rgb, resize_crop(rgb, height, width))
        out.append(cache[1])
    frames = np.stack(out)
    return frames, {
        "fps": float(info["fps"]),
        "duration": float(info["duration"] or last[0]),
        "src_height": int(info["height"]),
        "src_width": int(info["width"]),
        "motion_score": motion_score(frames),
    }


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files under ``root`` (recursive, sorted, hidden files and folders skipped)."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_EXTENSIONS
        ]
    return sorted(found)


def prepare_example(job: tuple[str, str, float, int, int, int, float | None]) -> dict[str, Any]:
    """Worker of the folder builder: ``(path, key, fps, height, width, min_frames, max_seconds)`` ->
    ``{"key", "example"}`` (JPEG frames + metadata) or ``{"key", "skipped": reason}``; never raises for a
    bad video."""
    path, key, fps, height, width, min_frames, max_seconds = job
    try:
        frames, info = decode_video(path, fps=fps, height=height, width=width, max_seconds=max_seconds)
    except (video_io.VideoError, OSError, ValueError, MemoryError) as e:
        return {"key": key, "skipped": f"unreadable: {e}"}
    if len(frames) < min_frames:
        return {
            "key": key,
            "skipped": f"too short: {len(frames)} frames at {fps:g} fps < {min_frames} ({info['duration']:.2f} s)",
        }
    return {
        "key": key,
        "example": {
            "frames": [encode_jpeg(f) for f in frames],
            "path": key,
            "fps": np.float32(info["fps"]),
            "duration": np.float32(info["duration"]),
            "num_frames": np.int32(len(frames)),
            "motion_score": np.float32(info["motion_score"]),
        },
    }
