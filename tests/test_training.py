"""SF-V training runs on the tiny config (configs/tiny.py): bitwise resume, an unreadable latest checkpoint,
a resume with another config, a halt on a non-finite batch, the CLI end to end (checkpoint, TensorBoard
scalars, sample mp4), a second writer refused, SIGTERM and SIGKILL, ``init_from`` and export.

``trainer.train`` and the CLI compile the programs of tests/test_train_steps.py; conftest's session-wide
persistent XLA cache shares them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import all_finite, tensorboard_scalars, to_host, trees_equal

from sfv_jax.checkpoint import pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.configs import tiny
from sfv_jax.data import video_io
from sfv_jax.parallel import sharding
from sfv_jax.training import export, trainer
from sfv_jax.training.checkpoints import checkpoint_manager, restore, restore_newest_readable
from sfv_jax.training.layout import build_modules, make_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def like():
    """The tiny config's abstract train state (shapes, dtypes, shardings): a restore target."""
    config = tiny.get_config()
    return make_layout(config, sharding.Plan.from_config(config), *build_modules(config)).abstract_state


def _config(**overrides):
    config = tiny.get_config()
    config.sample_every_steps = 0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    config.update_from_flattened_dict(overrides)
    return config


# the tests that start from a finished tiny run share it (one xdist worker: it is trained once)
TINY_RUN = pytest.mark.xdist_group("tiny_run")


def _folder_data(tiny_folder_dataset) -> dict:
    return {"data.kind": "folder", "data.path": str(tiny_folder_dataset)}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_folder_dataset):
    """(workdir, final state) of 3 tiny steps on the folder dataset, checkpoints at every step, 2 kept."""
    workdir = tmp_path_factory.mktemp("straight")
    config = _config(total_steps=3, keep_checkpoints=2, **_folder_data(tiny_folder_dataset))
    return workdir, trainer.train(config, workdir)


def _corrupt(checkpoint) -> None:
    """Truncate the largest file of a checkpoint folder (a write cut short)."""
    biggest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])


@TINY_RUN
def test_resume_is_bitwise_and_skips_an_unreadable_latest_checkpoint(like, tmp_path, tiny_folder_dataset, straight_run):
    """3 steps straight == the same run resumed from its step-2 checkpoint (restored state and data
    iterator) to 3, on a folder dataset built from mp4s. The step-3 checkpoint is damaged: named in one
    warning, moved aside (kept), the run resumes from the newest readable one. Without the fallback
    (checkpoint_fallback=False: the trainer's restore below) an error names it and nothing moves."""
    config = _config(total_steps=3, keep_checkpoints=2, **_folder_data(tiny_folder_dataset))
    shutil.copytree(straight_run[0], tmp_path / "b")
    _corrupt(tmp_path / "b" / "checkpoints" / "3")
    strict = tmp_path / "strict"
    shutil.copytree(tmp_path / "b", strict)

    with pytest.raises(CheckpointError, match=r"checkpoints/3 cannot be read .*checkpoint_fallback=True"):
        restore_newest_readable(checkpoint_manager(strict), like, strict, fallback=False)
    assert (strict / "checkpoints" / "3").is_dir() and not (strict / "unreadable_checkpoints").exists()

    assert config.checkpoint_fallback  # the default
    resumed = trainer.train(config, tmp_path / "b")
    assert (tmp_path / "b" / "unreadable_checkpoints" / "3").is_dir()
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps_this_run"] == 1  # from step 2
    for field in ("generator", "ema", "heads", "gen_opt", "disc_opt", "rng", "skipped", "step"):
        assert trees_equal(getattr(straight_run[1], field), getattr(resumed, field)), field
    mngr = checkpoint_manager(tmp_path / "b")
    assert mngr.all_steps() == [2, 3]  # keep_checkpoints = 2
    restored, meta = restore(mngr, straight_run[1])
    assert trees_equal(restored, straight_run[1])
    assert meta["data_position"] == 3 * 2 and meta["step"] == 3
    assert meta["data_iterator"]["position"] == 3 * 2 and meta["data_iterator"]["kind"] == "folder"
    assert meta["data_iterator"]["records"] == 5


@TINY_RUN
def test_resume_with_another_config_is_refused_before_writing(tmp_path, tiny_folder_dataset, straight_run):
    """Changing what shapes or means something on resume is refused, listing the keys, and nothing in the
    workdir changes (config.json included); total_steps, intervals and the mesh stay changeable."""
    from sfv_jax.training.run_config import ConfigError, resume_conflicts

    work = tmp_path / "b"
    shutil.copytree(straight_run[0], work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    config = _config(total_steps=3, keep_checkpoints=2, **_folder_data(tiny_folder_dataset))
    config.disc.channels, config.loss.recon_weight = 64, 0.5
    with pytest.raises(ConfigError, match=r"2 setting\(s\)[\s\S]*disc.channels: 32 -> 64[\s\S]*loss.recon_weight"):
        trainer.train(config, work)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    saved = json.loads((work / "config.json").read_text())
    safe = _config(total_steps=9, keep_checkpoints=4, log_every_steps=5, **_folder_data(tiny_folder_dataset))
    safe.mesh.data = 1
    assert resume_conflicts(saved, safe) == []
    # a workdir from before a setting existed resumes while the setting keeps the value its absence meant
    added = [("opt", "disc_updates"), ("loss", "sigma_max_prob"), ("disc", "spectral_norm"), ("disc", "feature_maps")]
    added += [("loss", f"distill_{name}") for name in ("weight", "min_guidance", "max_guidance")]
    for section, name in added:
        del saved[section][name]
    assert resume_conflicts(saved, safe) == []
    safe.opt.disc_updates = 2
    assert resume_conflicts(saved, safe) == ["opt.disc_updates: 1 -> 2"]


def test_workdir_that_is_a_file_refused(tmp_path):
    from sfv_jax.training.run_config import ConfigError

    (tmp_path / "w").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        trainer.train(_config(total_steps=1), tmp_path / "w")
    assert (tmp_path / "w").read_text() == "x"


def test_halt_on_nonfinite_checkpoints_last_finite_state(like, tmp_path, monkeypatch):
    """opt.nonfinite=halt: FloatingPointError, and the checkpoint of the failed step holds the finite state
    of the step before (both updates skipped); resuming would continue after the bad batch."""
    from sfv_jax.data.loader import Loader

    make_batch = Loader.batch

    def poisoned(self, position):
        batch = make_batch(self, position)
        if position == 2 * 2:  # the third step's samples
            batch["latents"] = np.full_like(batch["latents"], np.nan)
        return batch

    monkeypatch.setattr(Loader, "batch", poisoned)
    config = _config(total_steps=5, keep_checkpoints=5)
    config.opt.nonfinite = "halt"
    with pytest.raises(FloatingPointError, match="step 3: non-finite"):
        trainer.train(config, tmp_path)
    mngr = checkpoint_manager(tmp_path)
    assert mngr.all_steps() == [1, 2, 3]
    at2, _ = restore(mngr, like, 2)
    at3, meta = restore(mngr, like, 3)
    assert all_finite(at3) and int(at3.skipped) == 2 and meta["data_position"] == 3 * 2
    for field in ("generator", "ema", "heads", "gen_opt", "disc_opt"):
        assert trees_equal(getattr(at3, field), getattr(at2, field)), field


def _flags(overrides: dict) -> list[str]:
    """``--config.KEY=VALUE`` flags of the overrides ``_config`` takes."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "sfv_jax.cli.train", "--config", "configs/tiny.py", "--workdir", str(workdir), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return cmd, env


@TINY_RUN
@pytest.mark.parametrize("seed", [1])  # one seeded moment per CI run (0.5 s after the first save began)
def test_cli_lifecycle_sigkill_rerun_outputs_then_sigterm(tmp_path, tiny_folder_dataset, straight_run, seed, caplog):
    """``python -m sfv_jax.cli.train`` through a run's life, on the straight run's config:
    1. SIGKILLed at a seeded random moment after its first checkpoint started to be written (mid-step,
       mid-save or between), the rerun resumes from a complete checkpoint and ends bitwise where the
       uninterrupted in-process run ended (the rerun is ``trainer.train`` in this process, what the CLI
       runs: it reuses the straight run's programs instead of tracing and loading them in a new process);
    2. the rerun leaves its checkpoints, TensorBoard scalars for every step it ran, the held-out grip, a
       sample mp4 with its frame grid and diagnostics, and a summary; the export reads the EMA generator;
    3. a third run resumes the workdir, a fourth started beside it is refused (one writer per workdir),
       and SIGTERM makes the third checkpoint and exit 0."""
    import random

    workdir = tmp_path / "run"
    data = {**_folder_data(tiny_folder_dataset), "log_every_steps": 1}
    run = dict(
        total_steps=3,
        keep_checkpoints=2,
        checkpoint_every_steps=1,
        sample_every_steps=3,
        heldout_every_steps=3,
        heldout_steps=2,
        **data,
    )
    cmd, env = _main(workdir, *_flags(run))
    delay = random.Random(seed).uniform(0.0, 4.0)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (workdir / "checkpoints").is_dir() or not any((workdir / "checkpoints").iterdir()):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=60)
    with caplog.at_level(logging.INFO):
        trainer.train(_config(**run), workdir)
    rerun_log = caplog.text
    mngr = checkpoint_manager(workdir)
    assert mngr.all_steps() == [2, 3]  # keep_checkpoints = 2
    final, meta = restore(mngr, straight_run[1], 3)
    for field in ("generator", "ema", "heads", "gen_opt", "disc_opt", "rng", "skipped", "step"):
        assert trees_equal(getattr(final, field), getattr(straight_run[1], field)), (seed, delay, field)
    assert meta["data_position"] == 3 * 2

    # 2. the rerun's outputs: scalars for every step it ran (after the checkpoint it resumed from)
    resumed = re.search(r"resumed from \S+ at step (\d+)", rerun_log)
    resumed_at = int(resumed.group(1)) if resumed else 0
    ran = set(range(resumed_at + 1, 4))
    scalars = tensorboard_scalars(workdir)
    for tag in (
        "g_loss",
        "g_adv",
        "g_recon",
        "g_grad_norm",
        "d_loss",
        "d_hinge",
        "d_r1",
        "d_r1_share",
        "d_grad_norm",
        "skipped_updates",
        *(f"d_{s}_{kind}" for s in ("real", "fake", "acc") for kind in ("spatial", "temporal")),
    ):
        assert ran <= set(scalars[tag]), (tag, resumed_at)
        assert all(np.isfinite(list(scalars[tag].values()))), tag
    assert all(0 <= v <= 1 for v in scalars["d_acc_spatial"].values())
    assert "steps_per_sec" in scalars
    # per generator level (the levels this step's samples drew): margin and pair rank, sums already reduced
    ranks = {tag: v for tag, v in scalars.items() if tag.startswith("d_rank_temporal@")}
    assert ran <= {s for v in ranks.values() for s in v} and set(ranks) <= {
        f"d_rank_temporal@{x}" for x in ("2.27", "70.5", "700")
    }
    assert all(0 <= x <= 1 for v in ranks.values() for x in v.values()), ranks
    assert any(t.startswith("d_margin_spatial@") for t in scalars) and not any(
        t.startswith(("sum:", "count@")) for t in scalars
    )
    # the held-out grip at step 3: every level's margin and pair rank per head kind, and its console line
    grip = {t: v[3] for t, v in scalars.items() if t.startswith("heldout/")}
    kinds, levels = ("spatial", "temporal"), ("2.27", "70.5", "700")
    assert set(grip) == {f"heldout/d_{m}_{k}@{x}" for m in ("margin", "rank") for k in kinds for x in levels}
    assert all(0 <= v <= 1 for t, v in grip.items() if "rank" in t) and all(map(np.isfinite, grip.values()))
    assert "held-out grip at step 3 (4 clips): d_margin_spatial@2.27 " in rerun_log  # 2 steps x 2 clips
    frames, fps = video_io.read_video(workdir / "samples" / "step_0000003.mp4")
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8 and fps == pytest.approx(7)
    # the sample's frame grid (real clip above it) and its diagnostics against the real clip
    grid, _ = video_io.read_video(workdir / "samples" / "step_0000003.png")
    assert grid.shape == (1, 2 * 16 + 1, 4 * 16 + 3, 3)
    for tag in ("sample/motion_ratio", "sample/sharpness_ratio", "sample/frame0_psnr"):
        assert 3 in scalars[tag] and np.isfinite(scalars[tag][3]), tag
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["step"] == 3 and summary["skipped_updates"] == 0 and np.isfinite(summary["metrics"]["g_loss"])

    # export: the EMA generator becomes a pipeline folder that load_pipeline (and so the sample CLI) reads
    out = export.export_run(workdir, tmp_path / "exported")
    pipe = pretrained.load_pipeline(out, progress=False)
    assert trees_equal(pipe.unet_params, final.ema) and not trees_equal(pipe.unet_params, final.generator)
    assert json.loads((out / "sfv_jax.json").read_text())["trained_step"] == 3

    # 3. resume, a second writer refused, SIGTERM
    cmd, env = _main(
        workdir,
        "--config.total_steps=100000",
        "--config.keep_checkpoints=2",
        "--config.checkpoint_every_steps=100000",
        "--config.sample_every_steps=0",
        *_flags(data),
    )
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log, deadline = [], time.time() + 600
    try:
        for line in proc.stderr:  # wait until the resumed run has logged a step after 3
            log.append(line)
            if "] step 4/" in line and "g_loss " in line:
                break
            assert time.time() < deadline, "".join(log[-50:])
        # a second run on the same workdir is refused at once, naming the first; the first carries on
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by sfv-train (pid {proc.pid} on " in second.stderr.splitlines()[-1], second.stderr[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    log.append(rest)
    text = "".join(log)
    assert proc.returncode == 0, text[-4000:]
    assert "resumed from" in text and "at step 3" in text
    assert "stopped at step" in text
    stopped = checkpoint_manager(workdir).latest_step()
    assert stopped >= 4
    state, meta = restore(checkpoint_manager(workdir), straight_run[1])
    assert int(state.step) == stopped and meta["data_position"] == stopped * 2 and all_finite(state)


def test_cli_rejects_bad_config(tmp_path):
    cmd, env = _main(tmp_path, "--config.opt.nonfinite=sometimes")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--config.opt.nonfinite='sometimes'" in proc.stderr and "skip" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@TINY_RUN
def test_init_from_a_converted_pipeline_folder_then_export(tmp_path, straight_run):
    """--config.init_from: the generator starts from the folder's UNet, the VAE / image encoder are the
    folder's, and the export keeps them. (The folder is the exported shared tiny run, so the steps are
    the tiny config's, already compiled; diffusers -> converted folders are the converter's tests.)"""
    base = export.export_run(straight_run[0], tmp_path / "base")
    source = pretrained.load_pipeline(base, progress=False)
    config = _config(total_steps=1, init_from=str(base), seed=5)
    config.model.unet = config.model.vae = config.model.image_encoder = None
    state = trainer.train(config, tmp_path / "run")
    delta = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(to_host(state.generator)), jax.tree.leaves(to_host(source.unet_params)), strict=True
        )
    )
    # one SM3 step from zero accumulators: |update| <= lr (1 - b1) / sqrt(1 - b2) = 1.58e-4 per element
    assert 0 < delta <= 1e-5 * 0.5 / np.sqrt(1 - 0.999) * 1.001
    out = export.export_run(tmp_path / "run", tmp_path / "exported", weights="generator")
    assert json.loads((out / "sfv_jax.json").read_text())["weights"] == "generator"
    pipe = pretrained.load_pipeline(out, progress=False)
    assert trees_equal(pipe.unet_params, state.generator)
    assert trees_equal(pipe.vae_params, source.vae_params)
    assert trees_equal(pipe.image_encoder_params, source.image_encoder_params)
    # --dtype bfloat16: every component stored in bf16 (the converted VAE / image encoder re-saved), read
    # back as float32 by the loader: the bf16 rounding of the same weights, at about half the bytes
    half = export.export_run(tmp_path / "run", tmp_path / "bf16", weights="generator", dtype="bfloat16")
    pipe16 = pretrained.load_pipeline(half, progress=False)
    for got, want in ((pipe16.unet_params, state.generator), (pipe16.vae_params, source.vae_params)):
        assert trees_equal(got, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(np.float32), to_host(want)))
    assert jax.tree.leaves(pipe16.image_encoder_params)[0].dtype == np.float32

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    assert size(half) < 0.6 * size(out), (size(half), size(out))
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        export.export_run(tmp_path / "run", tmp_path / "exported7", step=7)
    assert not (tmp_path / "exported7").exists()
