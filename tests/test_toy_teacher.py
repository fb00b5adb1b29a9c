"""The shipped toy teacher (``sfv_jax/assets/toy_teacher``): it loads, fits its 20 MB, says how it
was made; through ``sfv-reproduce`` (the report's own protocol: the same reference clips, conditioning
frames and noise seeds) its 25-step samples beat its own 1-step samples on the cheap metrics, a short
SF-V distillation from it (adversarial loss only) beats the teacher's own 1-step samples, and the main job's
second stage (the teacher's guidance distilled into that generator's one pass) makes it sharper and more
colourful. The numbers these margins guard, measured on more videos, are in the asset's README and
docs/reproduction.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_time_bound_env

from sfv_jax.checkpoint import pretrained
from sfv_jax.data import video_io
from sfv_jax.evaluation import toy_protocol as tp

N = 8  # videos per row: the cheap metrics average N x 14 frames
# the short distillation: toy_sfv's defaults (the paper's method at toy size with the adversarial loss only,
# temporal heads only and half of the generator's updates at sigma_max), which pass the teacher's one step
# in 100 steps (at 50: not on every margin; see below)
STEPS = 100
SFV = "sfv_1"
# the main job's second stage from that run's export, short: the guidance objective's programs and a row
GUIDANCE_STEPS = 20
CFG = "sfv_cfg_1"
ROWS = f"real,vae,teacher_1,teacher_25,{SFV},{CFG}"


REPO = Path(__file__).resolve().parents[1]


def _reproduce(work: Path) -> subprocess.CompletedProcess:
    """``python -m sfv_jax.cli.reproduce --demo`` (the main job's training, without its held-out grip and final
    sample) on the shipped teacher (the default) with this file's rows, videos and steps, at -O2: bound by run
    time (SF-V steps, 25-step sampling, I3D at 224 px; conftest.run_time_bound_env)."""
    env = run_time_bound_env()
    argv = ["--workdir", str(work), "--demo", "--rows", ROWS, "--num-videos", str(N), "--steps", str(STEPS)]
    argv += ["--guidance-steps", str(GUIDANCE_STEPS)]
    cmd = [sys.executable, "-m", "sfv_jax.cli.reproduce", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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


# the report's tests run on one xdist worker (``--dist loadgroup``): the module-scoped fixture below is
# computed once per worker that runs any of them, and it is the file's whole cost (one reproduce run)
ON_REPORT = pytest.mark.xdist_group("toy_teacher_report")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy") / "repro"
    _reproduce(work)
    return work, {r["name"] + f"_{r['steps']}": r for r in json.loads((work / "report.json").read_text())["rows"]}


@ON_REPORT
def test_report_grids_and_resume(report):
    """report.json / report.md / one grid per row; a killed run (a row's result missing: the distilled one,
    whose run starts from the SF-V run's export) recomputes only that row on rerun, with the same numbers and
    without training again."""
    work, rows = report
    meta = json.loads((work / "report.json").read_text())
    assert meta["seed"] == meta["train_seed"] == 0 and meta["num_videos"] == N and meta["wall_s"] > 0
    assert list(rows) == ["real_0", "vae_0", "teacher_1", "teacher_25", SFV, CFG]
    for r in rows.values():
        assert np.isfinite(r["fvd"]) and r["motion"] > 0 and r["sharpness"] > 0 and r["colour"] > 0, r
    assert rows["real_0"]["frame0_psnr"] is None and np.isfinite(rows["teacher_1"]["frame0_psnr"])
    md = (work / "report.md").read_text()
    assert "| teacher | 1 |" in md and f"--rows {ROWS}" in md
    for key in ("real", "vae", "teacher_1", "teacher_25", SFV, CFG):
        grid, _ = video_io.read_video(work / "grids" / f"{key}.png")
        assert grid.shape == (1, 4 * tp.SIZE + 3, tp.FRAMES * tp.SIZE + tp.FRAMES - 1, 3), key
    mtime = (work / "rows" / "real.json").stat().st_mtime_ns
    (work / "rows" / f"{CFG}.json").unlink()
    out = _reproduce(work).stdout
    assert f"[reproduce] {CFG}:" in out and "training" not in out
    assert "[reproduce] real:" not in out and (work / "rows" / "real.json").stat().st_mtime_ns == mtime
    again = {r["name"] + f"_{r['steps']}": r for r in json.loads((work / "report.json").read_text())["rows"]}
    assert again == {**rows, CFG: {**rows[CFG], "wall_s": again[CFG]["wall_s"]}}


@ON_REPORT
def test_teacher_25_steps_beat_its_1_step(report):
    """The toy teacher is a working diffusion model: 25 Euler steps give sharper videos that move like the
    real clips; one step gives a blur (the paper's motivation)."""
    _, rows = report
    one, many = rows["teacher_1"], rows["teacher_25"]
    assert many["sharpness"] > 2.0 * one["sharpness"], (one, many)
    assert abs(np.log(many["motion"])) < abs(np.log(one["motion"])), (one, many)
    assert many["fvd"] < one["fvd"], (one, many)


@ON_REPORT
def test_short_distillation_beats_the_teachers_one_step(report):
    """SF-V from the shipped teacher for STEPS steps (the main job's run, adversarial loss only): its one-step
    videos, from the same conditioning frames and noise as the teacher's, are sharper, move more like the
    real clips and have a lower FVD than the teacher's own one step. Measured with these N and seeds
    (FVD / motion / sharpness): teacher 1 step 2584 / 0.368 / 0.0205; this run 2146 / 0.754 / 0.062; at 50
    steps 2405 / 0.451 / 0.027 (motion and sharpness short of the margins); the paper's loss needs 200 steps
    for 2295 / 0.577 / 0.033 (at 100: sharpness 0.019, below the teacher's). At 256 videos and 300 steps see
    docs/reproduction.md."""
    work, rows = report
    sfv, one = rows[SFV], rows["teacher_1"]
    assert sfv["sharpness"] > 1.3 * one["sharpness"], (one, sfv)
    assert sfv["motion"] > 1.25 * one["motion"] and abs(np.log(sfv["motion"])) < abs(np.log(one["motion"])), (one, sfv)
    assert sfv["fvd"] < one["fvd"] and sfv["frame0_psnr"] > 15, (one, sfv)
    frames, _ = video_io.read_video(work / "side_by_side.gif")  # conditioning, teacher 1 and 25, SF-V, distilled
    assert frames.shape == (tp.FRAMES, 4 * 4 * tp.SIZE + 3 * 2, 5 * 4 * tp.SIZE + 4 * 2, 3)
    assert (work / "side_by_side.mp4").is_file() and np.load(work / "rows" / f"{SFV}.npy").shape[0] == 4


@ON_REPORT
def test_distilled_guidance_brings_colour_and_sharpness(report):
    """The main job's second stage (``sfv_cfg``: the generator's own guided one step as the target of its
    unguided one, from the SF-V run's export) moves the one-pass videos toward the guided ones: more colour,
    which the adversarial game alone does not give, and sharper. Measured with these N, seeds and
    GUIDANCE_STEPS (colour / sharpness / FVD): SF-V 0.387 / 0.062 / 2146, after the stage 0.430 / 0.073 / 2097;
    the main job's 100 steps at 32 videos: docs/reproduction.md."""
    _, rows = report
    sfv, cfg = rows[SFV], rows[CFG]
    assert cfg["colour"] > 1.05 * sfv["colour"], (sfv, cfg)
    assert cfg["sharpness"] > 1.08 * sfv["sharpness"], (sfv, cfg)


@ON_REPORT
def test_vae_row_has_no_conditioning_frame(report):
    """The vae row (held-out clips through the teacher's VAE): the reconstructions keep the clips' motion
    (measured 0.79 with 8 videos, 1.03 with 32) and have no conditioning frame to compare with."""
    _, rows = report
    vae = rows["vae_0"]
    assert vae["frame0_psnr"] is None and np.isfinite(vae["fvd"])
    assert 0.5 < vae["motion"] < 1.5, vae
