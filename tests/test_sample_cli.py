"""``python -m sfv_jax.cli.sample`` on a tiny converted checkpoint: writes a playable mp4 (decoded and counted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from sfv_jax.data import video_io

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sfv_jax.cli.sample", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
    )


def test_cli_writes_a_playable_mp4(tiny_pipeline_dirs, tmp_path):
    converted = tiny_pipeline_dirs[2]
    img = tmp_path / "cond.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "video" / "out.mp4"
    proc = _run(
        "--model",
        str(converted),
        "--image",
        str(img),
        "--out",
        str(out),
        "--height",
        "48",
        "--width",
        "40",
        "--num-frames",
        "5",
        "--sampler",
        "sfv",
        "--fps",
        "7",
        "--strip",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames, fps = video_io.read_video(out)
    assert frames.shape == (5, 48, 40, 3) and fps == 7.0
    strip = np.asarray(PIL.Image.open(out.with_suffix(".png")))
    assert strip.shape == (48, 5 * 40, 3)
    timings = proc.stdout.strip().splitlines()[-1]
    for stage in ("image_encoder=", "vae_encode=", "unet=", "vae_decode="):
        assert stage in timings, proc.stdout


def test_cli_bad_inputs_fail_cleanly(tiny_pipeline_dirs, tmp_path):
    converted = tiny_pipeline_dirs[2]
    out = tmp_path / "out.mp4"
    proc = _run(
        "--model",
        str(converted),
        "--image",
        str(tmp_path / "missing.png"),
        "--out",
        str(out),
        "--height",
        "48",
        "--width",
        "40",
    )
    assert proc.returncode == 2 and "missing.png" in proc.stderr
    image = tmp_path / "x.png"
    PIL.Image.new("RGB", (8, 8)).save(image)  # a real image: it is read before the model
    proc = _run("--model", str(tmp_path), "--image", str(image), "--out", str(out))
    assert proc.returncode == 2 and "not an SVD pipeline folder" in proc.stderr
    proc = _run("--model", str(converted), "--image", str(image), "--out", str(tmp_path / "out.avi"))
    assert proc.returncode == 2 and "unsupported extension" in proc.stderr
    assert not out.exists()


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    """Bad --fps / --gif / --out combinations fail with `error:` before the model is even opened (the model
    path here does not exist: an error about it would mean the work had started)."""
    from sfv_jax.cli import sample

    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "file").write_text("x")
    base = ["--model", str(tmp_path / "no_model"), "--image", "x.png"]
    cases = [
        (["--out", str(tmp_path / "a.mp4"), "--fps", "0"], "fps must be a positive number"),
        (["--out", str(tmp_path / "a.mp4"), "--fps", "100", "--gif"], "GIF cannot play faster than 50"),
        (["--out", str(tmp_path / "folder.mp4")], "is a folder"),
        (["--out", str(tmp_path / "file" / "a.mp4")], "is a file, not a folder"),
    ]
    for args, message in cases:
        assert sample.main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "no_model" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.mp4"]


def test_a_failed_write_keeps_the_frames(tmp_path, monkeypatch, capsys):
    """A write that fails after the video was generated saves the frames beside --out and says where."""
    from sfv_jax.checkpoint import pretrained
    from sfv_jax.cli import sample

    frames = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)

    class FakePipe:
        last_timings: dict = {}

        def generate(self, images, seeds, settings, **k):
            return frames[None]

    def broken_write(path, frames, fps=7, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrained, "load_pipeline", lambda *a, **k: FakePipe())
    monkeypatch.setattr(video_io, "write_video", broken_write)
    out = tmp_path / "v.mp4"
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "x.png")  # a real image: it is read before the model
    assert sample.main(["--model", "m", "--image", str(tmp_path / "x.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    saved = tmp_path / "v.unsaved_frames.npy"
    assert "No space left on device" in err and str(saved) in err
    np.testing.assert_array_equal(np.load(saved), video_io.to_uint8(frames))
