"""The shipped toy teacher (``sfv_jax/assets/toy_teacher``, issue 17): it loads, fits its 20 MB, says how it
was made; through ``sfv-reproduce`` (the report's own protocol: the same reference clips, conditioning
frames and noise seeds) its 25-step samples beat its own 1-step samples on the cheap metrics, and a short
SF-V distillation from it beats the teacher's 1-step samples. The numbers these margins guard, measured
on more videos, are in the asset's README."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfv_jax import reproduce
from sfv_jax.checkpoint import pretrained
from sfv_jax.data import video_io
from sfv_jax.evaluation import toy_protocol as tp

N = 8  # videos per row: the cheap metrics average N x 14 frames
STEPS = 40  # SF-V training steps of the short distillation


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
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy") / "repro"
    rows = "vae,teacher_1,teacher_25,sfv_1"
    argv = ["--workdir", str(work), "--rows", rows, "--num-videos", str(N), "--steps", str(STEPS)]
    assert reproduce.main(argv) == 0  # the shipped teacher is the default
    return work, {r["name"] + f"_{r['steps']}": r for r in json.loads((work / "report.json").read_text())["rows"]}


def test_teacher_25_steps_beat_its_1_step(report):
    """The toy teacher is a working diffusion model: 25 Euler steps give sharper videos that move like the
    real clips; one step gives a blur (the paper's motivation)."""
    _, rows = report
    one, many = rows["teacher_1"], rows["teacher_25"]
    assert many["sharpness"] > 2.0 * one["sharpness"], (one, many)
    assert abs(np.log(many["motion"])) < abs(np.log(one["motion"])), (one, many)
    assert many["fvd"] < one["fvd"], (one, many)


def test_short_distillation_beats_the_teachers_1_step(report):
    """SF-V from the shipped teacher for STEPS steps: its one-step samples are sharper than the teacher's
    one-step samples and keep the conditioning frame."""
    work, rows = report
    sfv, one = rows["sfv_1"], rows["teacher_1"]
    assert sfv["sharpness"] > 1.3 * one["sharpness"], (sfv, one)
    assert sfv["frame0_psnr"] > one["frame0_psnr"] - 1.0, (sfv, one)
    # the main job's pictures: the side-by-side video (conditioning | teacher 1 | teacher 25 | SF-V 1)
    frames, _ = video_io.read_video(work / "side_by_side.gif")
    assert frames.shape == (tp.FRAMES, 4 * 4 * tp.SIZE + 3 * 2, 4 * 4 * tp.SIZE + 3 * 2, 3)
    assert (work / "side_by_side.mp4").is_file() and np.load(work / "rows" / "sfv_1.npy").shape[0] == 4


def test_vae_row_is_the_decoders_floor(report):
    """The vae row (held-out clips through the teacher's VAE) is closer to the real clips than any
    generated row, and it has no conditioning frame."""
    _, rows = report
    vae = rows["vae_0"]
    assert vae["frame0_psnr"] is None
    assert all(vae["fvd"] < rows[k]["fvd"] for k in ("teacher_1", "teacher_25", "sfv_1")), rows
