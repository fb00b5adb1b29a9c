"""sfv_jax.data.video_io: mp4 / gif / png round trips, to_uint8 rounding, errors, and atomic writes."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from sfv_jax.data import video_io
from sfv_jax.data.video_io import VideoError, read_video, to_uint8, video_info, write_video


def gradient(f: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth gradient moving one pixel per frame: uint8 [F, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    r = 128 + 100 * np.sin((x - t) / w * 2 * np.pi)
    g = 40 + 170 * y / h
    b = 128 + 90 * np.cos((x + y + 2 * t) / (w + h) * 2 * np.pi)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


@pytest.mark.parametrize("fps", [7, 7.5, Fraction(30000, 1001)])
def test_mp4_round_trip(tmp_path, fps):
    frames = gradient()
    out = write_video(tmp_path / "sub" / "v.mp4", frames, fps)
    assert out == tmp_path / "sub" / "v.mp4" and sorted(p.name for p in out.parent.iterdir()) == ["v.mp4"]
    got, got_fps = read_video(out)
    assert got.shape == frames.shape and got.dtype == np.uint8
    assert got_fps == pytest.approx(float(fps), rel=1e-6)
    assert mean_abs(got, frames) < 3
    with av.open(str(out)) as c:
        ctx = c.streams.video[0].codec_context
        assert (ctx.name, c.streams.video[0].format.name) == ("h264", "yuv420p")
    info = video_info(out)
    assert info == {
        "frames": 9,
        "fps": pytest.approx(float(fps), rel=1e-6),
        "width": 48,
        "height": 32,
        "duration": pytest.approx(9 / float(fps), rel=0.02),
        "codec": "h264",
    }


def test_mp4_float_frames_and_max_frames(tmp_path):
    frames = gradient()
    write_video(tmp_path / "v.mp4", frames.astype(np.float32) / 255, fps=7)
    got, fps = read_video(tmp_path / "v.mp4", max_frames=4)
    assert got.shape == (4, 32, 48, 3) and fps == 7.0
    assert mean_abs(got, frames[:4]) < 3


def test_mp4_odd_size_is_edge_padded_to_even(tmp_path):
    frames = gradient(5, 33, 47)
    write_video(tmp_path / "odd.mp4", frames)
    got, _ = read_video(tmp_path / "odd.mp4")
    assert got.shape == (5, 34, 48, 3)
    assert video_info(tmp_path / "odd.mp4")["width"] == 48
    assert mean_abs(got[:, :33, :47], frames) < 3
    padded = np.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")  # what was encoded
    assert mean_abs(got[:, 33], padded[:, 33]) < 4 and mean_abs(got[:, :, 47], padded[:, :, 47]) < 4


@pytest.mark.parametrize("fps", [7, 7.5])
def test_gif_round_trip(tmp_path, fps):
    frames = gradient()
    write_video(tmp_path / "v.gif", frames, fps)
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == 9 and im.info["loop"] == 0
    got, got_fps = read_video(tmp_path / "v.gif")
    assert got.shape == frames.shape
    assert got_fps == pytest.approx(fps, rel=0.03)  # delays are whole 1/100 s, spread to keep the average
    assert mean_abs(got, frames) < 6  # palettised: 256 colours per frame
    assert video_info(tmp_path / "v.gif")["duration"] == pytest.approx(9 / fps, abs=0.011)


@pytest.mark.parametrize(
    "ext, codec, pix_fmt, frames_known, tol",
    [
        ("webm", "libvpx-vp9", "yuv420p", False, 4),
        ("avi", "mpeg4", "yuv420p", True, 8),
        ("mov", "libx264", "yuv420p", True, 4),
        ("mkv", "ffv1", "yuv444p", False, 1),
    ],
)
def test_reads_other_containers(tmp_path, ext, codec, pix_fmt, frames_known, tol):
    frames, path = gradient(), tmp_path / f"v.{ext}"
    with av.open(str(path), "w") as c:  # written by PyAV directly, not by write_video
        stream = c.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, pix_fmt
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    got, fps = read_video(path)
    assert got.shape == frames.shape and fps == 8.0 and mean_abs(got, frames) < tol
    info = video_info(path)
    assert info["frames"] == (9 if frames_known else None) and info["fps"] == 8.0
    assert (info["width"], info["height"], info["duration"]) == (48, 32, pytest.approx(9 / 8))


def test_png_strip(tmp_path):
    frames = gradient(4, 8, 6)
    write_video(tmp_path / "s.png", frames)
    with Image.open(tmp_path / "s.png") as im:
        strip = np.asarray(im.convert("RGB"))
    assert strip.shape == (8, 4 * 6, 3)
    np.testing.assert_array_equal(strip, np.concatenate(list(frames), axis=1))


def test_to_uint8_matches_diffusers_rounding():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, (3, 5, 7, 3)).astype(np.float32)
    x[0, 0, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255]  # halfway cases
    np.testing.assert_array_equal(to_uint8(x), (np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(
        to_uint8(x.astype(np.float64)), (np.clip(x.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    )
    u = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    assert to_uint8(u) is u
    assert to_uint8(np.full((1, 1, 1, 3), np.nan, np.float32)).tolist() == [[[[0, 0, 0]]]]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3)),
        np.zeros((2, 4, 4, 4)),
        np.zeros((2, 3, 4, 4)),
        np.zeros((0, 4, 4, 3)),
        np.zeros((2, 4, 4, 3), np.int64),
    ],
)
def test_to_uint8_rejects_bad_frames(bad):
    with pytest.raises(VideoError, match=r"shape|dtype"):
        to_uint8(bad)


def test_write_errors_leave_nothing(tmp_path):
    with pytest.raises(VideoError, match=r"\.mp4, \.gif, \.png"):
        write_video(tmp_path / "v.avi", gradient())
    with pytest.raises(VideoError, match=r"\(2, 3, 4, 4\)"):
        write_video(tmp_path / "v.mp4", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(VideoError, match="fps"):
        write_video(tmp_path / "v.mp4", gradient(), fps=0)
    with pytest.raises(VideoError, match="fps"):
        write_video(tmp_path / "v.gif", gradient(), fps=60)
    with pytest.raises(VideoError, match="crf"):
        write_video(tmp_path / "v.mp4", gradient(), crf=70)
    assert list(tmp_path.iterdir()) == []


def test_encoder_failure_mid_mp4_leaves_no_file(tmp_path, monkeypatch):
    original, calls = av.VideoFrame.from_ndarray, []

    def from_ndarray(*args, **kwargs):  # the container is open and frames 0-1 are encoded when this raises
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder exploded")
        return original(*args, **kwargs)

    monkeypatch.setattr(video_io.av, "VideoFrame", type("VideoFrame", (), {"from_ndarray": from_ndarray}))
    with pytest.raises(RuntimeError, match="exploded"):
        write_video(tmp_path / "v.mp4", gradient())
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["v.gif", "v.png"])
def test_pillow_failure_mid_save_leaves_no_file(tmp_path, monkeypatch, name):
    def save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(video_io.Image.Image, "save", save)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / name, gradient())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v.png"])
def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch, name):
    monkeypatch.setattr(video_io.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError("nope")))
    with pytest.raises(PermissionError):
        write_video(tmp_path / name, gradient())
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = write_video(tmp_path / "v.png", gradient(2, 4, 4))
    before = target.read_bytes()
    monkeypatch.setattr(video_io.np, "concatenate", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_video(target, gradient(3, 4, 4))
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.png"]


def test_read_errors(tmp_path):
    for fn in (read_video, video_info):
        with pytest.raises(VideoError, match=r"missing\.mp4: no such video file"):
            fn(tmp_path / "missing.mp4")
        with pytest.raises(VideoError, match="folder"):
            fn(tmp_path)
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for fn in (read_video, video_info):
        with pytest.raises(VideoError, match=r"x\.mp4"):
            fn(corrupt)
    truncated = tmp_path / "t.mp4"
    truncated.write_bytes(write_video(tmp_path / "ok.mp4", gradient()).read_bytes()[:600])
    with pytest.raises(VideoError, match=r"t\.mp4"):
        read_video(truncated)
    with pytest.raises(VideoError, match="max_frames"):
        read_video(tmp_path / "ok.mp4", max_frames=0)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    for fn in (read_video, video_info):
        with pytest.raises(VideoError, match=r"a\.m4a: the file has no video stream"):
            fn(path)


def test_video_grid_places_each_video_and_repeats_stills(tmp_path):
    """video_grid: cell (r, c) is column c's video r, scaled by nearest neighbour; a 1-frame column (the
    conditioning image) is shown on every frame; white gaps; mismatched columns are an error."""
    rng = np.random.default_rng(0)
    still = rng.integers(0, 256, (2, 1, 4, 5, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)
    grid = video_io.video_grid([still, video], gap=1, scale=2)
    assert grid.shape == (3, 2 * 8 + 1, 2 * 10 + 1, 3)
    for t in range(3):
        for r in range(2):
            top = r * 9
            np.testing.assert_array_equal(grid[t, top : top + 8 : 2, 0:10:2], still[r, 0])
            np.testing.assert_array_equal(grid[t, top + 1 : top + 8 : 2, 11:21:2], video[r, t])
    assert (grid[:, 8] == 255).all() and (grid[:, :, 10] == 255).all()
    assert video_io.write_video(tmp_path / "g.gif", grid).is_file()
    with pytest.raises(video_io.VideoError, match="video_grid"):
        video_io.video_grid([still, video[:, :2, :3]])
