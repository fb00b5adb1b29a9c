"""``python -m sfv_jax.sample`` on a tiny converted checkpoint: writes a playable mp4 (decoded and counted)."""

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
        [sys.executable, "-m", "sfv_jax.sample", *args],
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
        "--frames",
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
    proc = _run("--model", str(tmp_path), "--image", "x.png", "--out", str(out))
    assert proc.returncode == 2 and "not an SVD pipeline folder" in proc.stderr
    proc = _run("--model", str(converted), "--image", "x.png", "--out", str(tmp_path / "out.avi"))
    assert proc.returncode == 2 and "unsupported extension" in proc.stderr
    assert not out.exists()
