"""The shipped toy teacher (``sfv_jax/assets/toy_teacher``, issue 17): it loads, fits its 20 MB, says how it
was made; through ``sfv-reproduce`` (the report's own protocol: the same reference clips, conditioning
frames and noise seeds) its 25-step samples beat its own 1-step samples on the cheap metrics, and a short
SF-V distillation from it runs end to end (whether it beats the teacher's 1-step samples is not shown yet:
issue 17). The numbers these margins guard, measured on more videos, are in the asset's README."""

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


def test_short_distillation_runs_and_writes_the_side_by_side(report):
    """SF-V from the shipped teacher for STEPS steps (the main job's path at smoke size): a one-step row,
    its cached videos and the side-by-side video (conditioning | teacher 1 | teacher 25 | SF-V 1).
    Whether the distilled one-step samples beat the teacher's is the report's question and is not shown
    yet: measured, 40 steps (8 videos) sharpness 0.015 against the teacher's 0.021, 150 steps (32 videos,
    ``--demo``) 0.021 against 0.019 (see the README's toy-world section); no margin is asserted here."""
    work, rows = report
    sfv = rows["sfv_1"]
    assert np.isfinite(sfv["fvd"]) and sfv["motion"] > 0 and sfv["sharpness"] > 0 and sfv["frame0_psnr"] > 15
    frames, _ = video_io.read_video(work / "side_by_side.gif")
    assert frames.shape == (tp.FRAMES, 4 * 4 * tp.SIZE + 3 * 2, 4 * 4 * tp.SIZE + 3 * 2, 3)
    assert (work / "side_by_side.mp4").is_file() and np.load(work / "rows" / "sfv_1.npy").shape[0] == 4


def test_vae_row_has_no_conditioning_frame(report):
    """The vae row (held-out clips through the teacher's VAE): the reconstructions keep the clips' motion
    (measured 0.79 with 8 videos, 1.03 with 32) and have no conditioning frame to compare with."""
    _, rows = report
    vae = rows["vae_0"]
    assert vae["frame0_psnr"] is None and np.isfinite(vae["fvd"])
    assert 0.5 < vae["motion"] < 1.5, vae
