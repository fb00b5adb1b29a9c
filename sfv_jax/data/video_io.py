"""Video file reading and writing (the project's one owner of it), with PyAV and Pillow; no system ffmpeg needed.

Frames are channels-last numpy arrays: ``[F, H, W, 3]`` RGB, either uint8 or float in ``[0, 1]``.

* :func:`to_uint8` -- float ``[0, 1]`` -> uint8 exactly as diffusers' ``numpy_to_pil`` does it.
* :func:`write_video` -- ``.mp4`` (H.264, yuv420p), ``.gif`` or ``.png`` (a horizontal frame strip), atomically;
  :func:`check_output` -- what it would refuse, checked before the frames exist.
* :func:`frame_grid` -- several videos as one image: a row of frames per video (reports, TensorBoard).
* :func:`read_video` -- decode any video PyAV's bundled ffmpeg reads (mp4, webm, avi, mov, gif, ...).
* :func:`video_info` -- frame count, fps, size, duration and codec without decoding the frames.
* :func:`iter_frames` -- stream (seconds, frame) pairs without holding the video in memory.

Every problem with the caller's frames or files is a :class:`VideoError` that names the shape or the file.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

SUPPORTED_WRITE = (".mp4", ".gif", ".png")
MAX_GIF_FPS = 50.0  # GIF delays are whole 1/100 s; viewers slow down delays under 2/100 s
_INTERP = av.video.reformatter.Interpolation
# swscale's default yuv420p -> RGB path takes chroma from the nearest sample; interpolating it (and rounding
# accurately) cuts our mp4 round-trip error on colour gradients ~4x (mean 2.3 -> 0.6 levels at crf 0).
_DECODE_INTERPOLATION = _INTERP.BILINEAR | _INTERP.FULL_CHR_H_INT | _INTERP.ACCURATE_RND


class VideoError(ValueError):
    """Frames of the wrong shape or dtype, an unsupported extension, or a missing or unreadable video file."""


def to_uint8(frames: Any) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` (float in ``[0, 1]`` or uint8; numpy or jax) -> uint8 ``[F, H, W, 3]``.

    Floats are clipped to ``[0, 1]`` and mapped by ``round(x * 255)``, as diffusers' ``numpy_to_pil``
    (``(images * 255).round().astype("uint8")``). float32/float64 are computed in their own precision,
    other floats (float16, bfloat16) in float32; NaN maps to 0. uint8 input is returned as is (not copied).
    """
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise VideoError(f"expected frames of shape [F, H, W, 3] (channels-last RGB), got shape {x.shape}")
    if 0 in x.shape:
        raise VideoError(f"expected at least one non-empty frame, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "fV":  # ml_dtypes' bfloat16 & co. have kind "V"
        raise VideoError(f"expected float frames in [0, 1] or uint8, got dtype {x.dtype} (shape {x.shape})")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    return (x * 255).round().astype(np.uint8)


def check_output(path: str | os.PathLike, fps: float = 7, *, crf: int = 18) -> Path:
    """Everything :func:`write_video` would refuse about ``path`` and its options, checked before any work
    (a command calls it before generating frames): the extension, ``fps`` (positive; at most 50 for a
    GIF), ``crf``, and a path that is an existing folder or under a file. Returns the path."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_WRITE:
        raise VideoError(f"{path}: unsupported extension {path.suffix!r}; supported: {', '.join(SUPPORTED_WRITE)}")
    try:
        fps_ok = math.isfinite(float(fps)) and fps > 0
    except (TypeError, ValueError):
        fps_ok = False
    if not fps_ok:
        raise VideoError(f"{path}: fps must be a positive number, got {fps!r}")
    if ext == ".gif" and fps > MAX_GIF_FPS:
        raise VideoError(f"{path}: GIF cannot play faster than {MAX_GIF_FPS:g} fps, got {fps!r}; write an .mp4")
    if ext == ".mp4" and not (isinstance(crf, (int, np.integer)) and 0 <= crf <= 51):
        raise VideoError(f"{path}: crf must be an integer in 0..51, got {crf!r}")
    if path.is_dir():
        raise VideoError(f"{path}: is a folder; name the video file to write (e.g. {path / 'video'}{ext})")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise VideoError(f"{path}: cannot be written: {blocker} is a file, not a folder")
    return path


def write_video(path: str | os.PathLike, frames: Any, fps: float = 7, *, crf: int = 18) -> Path:
    """Write frames ``[F, H, W, 3]`` (float ``[0, 1]`` or uint8, see :func:`to_uint8`) to ``path``; return it.

    The format follows the extension:

    * ``.mp4``: H.264 (libx264, ``crf`` 0..51, lower is better; 18 is visually lossless), pix_fmt yuv420p
      (BT.601 limited range, tagged; chroma sited where H.264 players expect it), so it plays everywhere.
      yuv420p needs an even width and height: an odd ``H``/``W`` is padded to the next even size by
      repeating the last row/column, so reading the file back gives ``[F, H + H % 2, W + W % 2, 3]``.
      ``fps`` (a float or a Fraction) becomes an exact Fraction frame rate (7.5 -> 15/2,
      29.97002997 -> 30000/1001).
    * ``.gif``: Pillow, an adaptive 256-colour palette per frame, looping forever. GIF delays are whole
      1/100 s, so per-frame delays alternate (e.g. 14 and 15 cs at 7 fps) to keep the average rate
      ``fps``; fps above 50 is refused. Pillow merges consecutive identical frames into one longer frame
      (same playback, fewer frames when read back).
    * ``.png``: one image, all frames side by side: shape ``[H, F * W, 3]``, lossless.

    The file is written to a temporary file in the same folder and then renamed over ``path``, so a
    failure never leaves a half-written file behind. Parent folders are created.
    """
    path = check_output(path, fps, crf=crf)
    ext = path.suffix.lower()
    frames = to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:
        if ext == ".mp4":
            _write_mp4(tmp, frames, fps, crf)
        elif ext == ".gif":
            _write_gif(tmp, frames, fps)
        else:
            Image.fromarray(np.concatenate(list(frames), axis=1)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except av.FFmpegError as e:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{path}: writing failed: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def frame_grid(videos: Any, *, gap: int = 1) -> np.ndarray:
    """Videos ``[R, F, H, W, 3]`` (float ``[0, 1]`` or uint8; or a list of equal-shape videos) -> one uint8
    image ``[R * H + (R - 1) * gap, F * W + (F - 1) * gap, 3]``: video r's frames left to right in row r,
    separated by ``gap`` white pixels. ``write_video(path.png, grid[None])`` saves it."""
    vids = [to_uint8(v) for v in videos]
    if not vids or any(v.shape != vids[0].shape for v in vids):
        raise VideoError(f"frame_grid: needs >= 1 videos of one shape, got {[v.shape for v in vids]}")
    r, (f, h, w, c) = len(vids), vids[0].shape
    out = np.full((r * h + (r - 1) * gap, f * w + (f - 1) * gap, c), 255, np.uint8)
    for i, v in enumerate(vids):
        for t in range(f):
            out[i * (h + gap) : i * (h + gap) + h, t * (w + gap) : t * (w + gap) + w] = v[t]
    return out


def video_grid(columns: Any, *, gap: int = 2, scale: int = 1) -> np.ndarray:
    """Side-by-side videos: ``columns`` [C][R, F, H, W, 3] (float ``[0, 1]`` or uint8; a still image is a
    video of one frame, repeated) -> uint8 frames ``[F, R * h + (R - 1) * gap, C * w + (C - 1) * gap, 3]``
    with ``h, w = H * scale, W * scale`` (nearest-neighbour): cell (r, c) shows column c's video r, the
    gaps are white. ``write_video(path.mp4 | path.gif, grid)`` saves it."""
    cols = [np.stack([to_uint8(v) for v in col]) for col in columns]
    r, f = cols[0].shape[0], max(c.shape[1] for c in cols)
    if any(c.shape[0] != r or c.shape[2:] != cols[0].shape[2:] or c.shape[1] not in (1, f) for c in cols):
        shapes = [c.shape for c in cols]
        raise VideoError(f"video_grid: columns of R videos of one size and 1 or F frames, got {shapes}")
    h, w = cols[0].shape[2] * scale, cols[0].shape[3] * scale
    out = np.full((f, r * h + (r - 1) * gap, len(cols) * w + (len(cols) - 1) * gap, 3), 255, np.uint8)
    for j, col in enumerate(cols):
        big = col.repeat(scale, axis=2).repeat(scale, axis=3)
        for i in range(r):
            out[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = big[i]
    return out


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` (H, W even) -> yuv420p planes Y, U, V flattened into ``[3 * H // 2, W]``.

    BT.601 limited range. Chroma is sited as H.264 decoders assume by default (chroma_sample_loc_type 0):
    horizontally on the even luma columns ([1, 2, 1] / 4 filter), vertically between the two rows. swscale's
    rgb -> yuv420p sites it centred instead, which shifts colour edges by half a chroma sample on playback.
    """
    x = rgb.astype(np.float32) / 255
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    planes = [16 + 219 * y]
    for c in ((x[..., 2] - y) / 1.772, (x[..., 0] - y) / 1.402):  # Cb, Cr in [-0.5, 0.5]
        c = np.pad((c[0::2] + c[1::2]) / 2, ((0, 0), (1, 1)), mode="edge")
        planes.append(128 + 224 * (0.25 * c[:, 0:-2:2] + 0.5 * c[:, 1:-1:2] + 0.25 * c[:, 2::2]))
    flat = np.concatenate([np.clip(np.round(p), 0, 255).astype(np.uint8).ravel() for p in planes])
    return flat.reshape(-1, rgb.shape[1])


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    """H.264 yuv420p; odd H/W padded by edge replication (see :func:`write_video`)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(1001)
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        stream.codec_context.colorspace = av.video.reformatter.Colorspace.ITU601
        stream.codec_context.color_range = av.video.reformatter.ColorRange.MPEG
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(rgb), format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> None:
    """Per-frame delays in ms, multiples of 10, whose running sum tracks ``i / fps`` (error diffusion)."""
    ends = [round(i * 100 / fps) for i in range(len(frames) + 1)]
    durations = [10 * max(1, b - a) for a, b in itertools.pairwise(ends)]
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def _open(path: str | os.PathLike) -> tuple[Path, Any]:
    """Open ``path`` for reading; a missing or unreadable file -> VideoError naming it."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path, av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: not a readable video file ({e})") from e


def _video_stream(path: Path, container: Any) -> Any:
    if not container.streams.video:
        raise VideoError(f"{path}: the file has no video stream")
    return container.streams.video[0]


def _duration(container: Any, stream: Any) -> float | None:
    """Seconds: the stream's own duration, else the container's; None if neither is recorded."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def _fps(container: Any, stream: Any) -> float:
    """Average frame rate: average_rate, else guessed_rate, else frames / duration (0.0 if none is known).

    For GIFs, whose delays vary per frame, ffmpeg estimates average_rate from the first few frames only,
    so frames / duration (both known exactly for GIFs) comes first.
    """
    duration = _duration(container, stream)
    by_count = stream.frames / duration if stream.frames and duration else None
    if stream.codec_context.name == "gif" and by_count:
        return float(by_count)
    for rate in (stream.average_rate, stream.guessed_rate, by_count):
        if rate:
            return float(rate)
    return 0.0


def read_video(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode all frames (or the first ``max_frames``) of a video file -> (uint8 ``[F, H, W, 3]`` RGB, fps).

    Reads anything PyAV's bundled ffmpeg can (mp4, webm, avi, mov, mkv, gif, ...); uses the first video
    stream. ``fps`` is the stream's average frame rate (see :func:`video_info`). Frames whose size differs
    from the first frame's are rescaled to it. Raises VideoError for a missing file, a file that cannot be
    opened or decoded, a file without a video stream or without any decodable frame.
    """
    if max_frames is not None and (not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise VideoError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    path, container = _open(path)
    with container:
        stream = _video_stream(path, container)
        stream.thread_type = "AUTO"
        out: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                size = {"width": out[0].shape[1], "height": out[0].shape[0]} if out else {}
                out.append(frame.to_ndarray(format="rgb24", interpolation=_DECODE_INTERPOLATION, **size))
                if max_frames is not None and len(out) >= max_frames:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"{path}: cannot decode the video after {len(out)} frames ({e})") from e
        if not out:
            raise VideoError(f"{path}: the video stream has no decodable frames")
        return np.stack(out), _fps(container, stream)


def video_info(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a video file's first video stream, without decoding its frames.

    Returns ``{"frames": int | None, "fps": float, "width": int, "height": int, "duration": float | None,
    "codec": str}``: ``frames`` is None when the container does not record a count (e.g. webm), ``duration``
    is in seconds (None when unknown), ``fps`` is the average frame rate (0.0 when unknown), ``codec`` is
    ffmpeg's decoder name (``"h264"``, ``"vp9"``, ``"gif"``, ...). Errors as :func:`read_video`.
    """
    path, container = _open(path)
    with container:
        stream = _video_stream(path, container)
        ctx = stream.codec_context
        return {
            "frames": int(stream.frames) or None,
            "fps": _fps(container, stream),
            "width": int(ctx.width),
            "height": int(ctx.height),
            "duration": _duration(container, stream),
            "codec": ctx.name,
        }


def iter_frames(path: str | os.PathLike) -> Iterator[tuple[float, float, np.ndarray]]:
    """Stream a video's frames: yields ``(seconds, frame_duration, uint8 [H, W, 3])`` in presentation order.

    ``seconds`` is the frame's presentation time relative to the first frame (from its pts; frames
    without a pts are spaced by ``frame_duration``); ``frame_duration`` is ``1 / fps`` of the stream's
    average rate (used for the last frame's end). Only one frame is in memory at a time. Errors as
    :func:`read_video`; a decode error after some frames raises VideoError naming how many were read.
    """
    path, container = _open(path)
    with container:
        stream = _video_stream(path, container)
        stream.thread_type = "AUTO"
        fps = _fps(container, stream)
        step = 1.0 / fps if fps > 0 else 1.0 / 25
        count, t0, last, size = 0, None, None, {}
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else None
                if t is None:
                    t = (last + step) if last is not None else 0.0
                elif t0 is None:
                    t0 = t
                t = t - (t0 or 0.0) if frame.pts is not None else t
                if last is not None and t <= last:  # a repeated or out-of-order pts: keep the order we got
                    t = last + 1e-6
                last = t
                rgb = frame.to_ndarray(format="rgb24", interpolation=_DECODE_INTERPOLATION, **size)
                size = size or {"width": rgb.shape[1], "height": rgb.shape[0]}
                count += 1
                yield t, step, rgb
        except av.FFmpegError as e:
            raise VideoError(f"{path}: cannot decode the video after {count} frames ({e})") from e
        if not count:
            raise VideoError(f"{path}: the video stream has no decodable frames")
