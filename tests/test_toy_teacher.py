"""The shipped toy teacher (``sfv_jax/assets/toy_teacher``, issue 17): it loads, fits its 20 MB, says how it
was made, its 25-step samples beat its own 1-step samples on the cheap metrics, and a short SF-V
distillation from it beats the teacher's 1-step samples. The numbers these margins guard are in the
asset's README (measured on more videos); the tests use the reproduction's own protocol
(``evaluation/toy_protocol.py``: the same reference clips, conditioning frames and noise seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfv_jax import reproduce
from sfv_jax.checkpoint import pretrained
from sfv_jax.data import video_metrics
from sfv_jax.evaluation import toy_protocol as tp

N = 8  # videos per row: the cheap metrics are averages over N x 14 frames


def _cheap(videos: np.ndarray, real: np.ndarray) -> dict:
    return {
        "motion": video_metrics.motion(videos) / video_metrics.motion(real),
        "sharpness": video_metrics.sharpness(videos) / video_metrics.sharpness(real),
        "frame0_psnr": video_metrics.frame0_fidelity(videos, real[:, 0]),
    }


def test_shipped_teacher_folder():
    folder = tp.TOY_TEACHER
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size
    readme = (folder / "README.md").read_text()
    for needed in ("launch/toy_teacher.sh", "seed", "wall time", "scaling_factor"):
        assert needed in readme, needed
    meta = json.loads((folder / "sfv_jax.json").read_text())
    assert meta["component"] == "pipeline" and meta["trained_step"] > 0
    pipe = pretrained.load_pipeline(folder, progress=False)
    assert pipe.unet.config.num_frames == tp.FRAMES and pipe.vae_scale_factor == 4


@pytest.fixture(scope="module")
def teacher_rows():
    pipe = pretrained.load_pipeline(tp.TOY_TEACHER, progress=False)
    real = tp.reference_clips(0, N)
    seeds = tp.noise_seeds(0, N)
    return real, {s: tp.generate(pipe, tp.Row("teacher", "teacher", s), real[:, 0], seeds) for s in (1, 25)}


def test_teacher_25_steps_beat_its_1_step(teacher_rows):
    """The toy teacher is a working diffusion model: 25 Euler steps give sharp moving videos, one step a
    blur (the paper's motivation). Measured margins in the asset's README."""
    real, videos = teacher_rows
    one, many = (_cheap(videos[s], real) for s in (1, 25))
    assert many["sharpness"] > 1.5 * one["sharpness"], (one, many)
    assert many["sharpness"] > 0.5, many
    assert abs(np.log(many["motion"])) < abs(np.log(one["motion"])), (one, many)


def test_short_distillation_beats_the_teachers_1_step(teacher_rows, tmp_path):
    """SF-V from the shipped teacher for a few dozen steps (``sfv-reproduce``'s own run): its one-step
    samples are sharper than the teacher's one-step samples and keep the conditioning frame."""
    real, videos = teacher_rows
    work = tmp_path / "repro"
    argv = ["--workdir", str(work), "--rows", "sfv_1", "--num-videos", str(N), "--steps", "40"]
    assert reproduce.main(argv) == 0
    sfv = np.load(work / "rows" / "sfv_1.npy")
    report = json.loads((work / "report.json").read_text())["rows"][0]
    teacher_one = _cheap(videos[1], real)
    assert report["sharpness"] > 1.3 * teacher_one["sharpness"], (report, teacher_one)
    assert report["frame0_psnr"] > teacher_one["frame0_psnr"] - 1.0, (report, teacher_one)
    assert sfv.shape == (4, tp.FRAMES, tp.SIZE, tp.SIZE, 3)
