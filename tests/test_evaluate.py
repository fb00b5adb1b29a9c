"""The FVD evaluation: the smoke evaluation of the tiny checkpoint on a tiny folder dataset writes
the table, on 2 devices, and resumes after a lost chunk on 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags_with

from sfv_jax.evaluation import protocol

ROOT = Path(__file__).resolve().parents[1]


def test_chunks_cover_every_video_once_across_processes():
    n, size = 37, 4
    spans = protocol.chunks(n, size)
    assert spans[0] == (0, 4) and spans[-1] == (36, 37)
    for procs in (1, 3, 8):
        mine = [protocol.my_chunks(n, size, p, procs) for p in range(procs)]
        assert sorted(c for m in mine for c in m) == list(range(len(spans)))


def _evaluate(workdir: Path, converted: Path, dataset: Path, log: Path, devices: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_with(devices)}
    args = [
        sys.executable,
        "-m",
        "sfv_jax.cli.evaluate",
        "--config",
        "configs/eval_tiny.py",
        "--workdir",
        str(workdir),
        f"--config.data.path={dataset}",
        f"--config.eval.sfv_model={converted}",
        f"--config.eval.teacher_model={converted}",
        "--config.eval.num_videos=3",
        "--config.eval.chunk_size=2",
        "--config.eval.batch_size=1",
        "--config.eval.i3d_batch_size=1",
        "--config.eval.sfv_steps=(1,)",
        "--config.eval.teacher_steps=(2,)",
    ]
    with open(log, "w") as out:
        return subprocess.run(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)


def test_smoke_evaluation_writes_the_table_and_resumes(tiny_pipeline_dirs, tiny_folder_dataset, tmp_path):
    converted, workdir, log = tiny_pipeline_dirs[2], tmp_path / "eval", tmp_path / "eval.log"
    proc = _evaluate(workdir, converted, tiny_folder_dataset, log, devices=1)
    assert proc.returncode == 0, log.read_text()[-4000:]
    table = json.loads((workdir / "fvd_table.json").read_text())
    rows = table["rows"]
    assert [(r["model"], r["sampler"], r["steps"]) for r in rows] == [("SF-V", "sfv", 1), ("SVD", "svd", 2)]
    for r in rows:
        assert np.isfinite(r["fvd"]) and r["fvd"] > 0 and r["num_videos"] == 3
        assert 0 < r["unet_latency_s"] <= r["e2e_latency_s"]
        assert all(r["seconds_per_video"][s] > 0 for s in ("unet", "vae_decode", "i3d"))
    md = (workdir / "fvd_table.md").read_text()
    assert "| SF-V | 1 |" in md and "| SVD | 2 |" in md and "smoke test" in md
    assert rows[0]["fingerprint"] == protocol.model_fingerprint(converted) and f"`{rows[0]['fingerprint']}`" in md

    # the cache: the generated videos at the FVD size, features per chunk; the real statistics
    sfv_folder = next((workdir / "rows").glob("SF-V-*"))
    chunk = protocol.read_chunk(sfv_folder / "chunk_00000.npz")
    assert chunk["videos"].shape == (2, 9, 16, 16, 3) and chunk["videos"].dtype == np.uint8
    assert chunk["features"].shape == (2, 400) and chunk["indices"].tolist() == [0, 1]
    assert protocol.read_chunk(sfv_folder / "chunk_00001.npz")["indices"].tolist() == [2]  # the short last chunk
    assert (next((workdir / "reference").iterdir()) / "real_stats.npz").is_file()

    # a lost chunk (killed run): a rerun on 2 devices generates only it and recomputes the SF-V row; the
    # teacher's files are reused untouched. Its videos were made one per call on one device and are now one
    # batch split over 2 devices: each video depends only on its image and seed (pipeline.generate)
    svd_folder = next((workdir / "rows").glob("SVD-*"))
    svd_mtimes = {p.name: p.stat().st_mtime_ns for p in svd_folder.iterdir()}
    (sfv_folder / "chunk_00000.npz").unlink()
    (sfv_folder / "result.json").unlink()
    proc = _evaluate(workdir, converted, tiny_folder_dataset, log, devices=2)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert json.loads((workdir / "fvd_table.json").read_text())["devices"]["count"] == 2
    again = protocol.read_chunk(sfv_folder / "chunk_00000.npz")
    diff = np.abs(again["videos"].astype(int) - chunk["videos"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())  # uint8 rounding
    # the few pixels one grey level apart move the I3D logits by well under 1% of their range
    assert np.abs(again["features"] - chunk["features"]).max() <= 1e-2 * np.abs(chunk["features"]).max()
    assert {p.name: p.stat().st_mtime_ns for p in svd_folder.iterdir()} == svd_mtimes
    rerun = json.loads((workdir / "fvd_table.json").read_text())["rows"]
    assert rerun[1] == rows[1] and abs(rerun[0]["fvd"] - rows[0]["fvd"]) <= 1e-2 * rows[0]["fvd"]
    assert "real videos" not in log.read_text()  # the reference set was not rebuilt


def test_cache_key_follows_the_model_not_its_path(tiny_pipeline_dirs, tmp_path):
    """Another model written to the same path gets new cache folders (with the path alone
    as the key, a replaced model would "score" the old FVD)."""
    import shutil

    from sfv_jax.configs import eval_tiny
    from sfv_jax.evaluation.runner import Row, generation_settings, rows

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dirs[2], model)
    config = eval_tiny.get_config()
    before = Row("SF-V", str(model), "sfv", 1)
    assert Row("SF-V", str(model), "sfv", 1).key(config) == before.key(config)  # stable
    weights = next(p for p in (model / "unet").rglob("*") if p.is_file() and p.suffix != ".json")
    weights.write_bytes(weights.read_bytes() + b"\0")  # other weights, same path
    after = Row("SF-V", str(model), "sfv", 1)
    assert after.fingerprint != before.fingerprint and after.key(config) != before.key(config)
    config_file = model / "unet" / "config.json"
    config_file.write_text(config_file.read_text().replace("{", '{"changed": 1, ', 1))
    assert Row("SF-V", str(model), "sfv", 1).fingerprint != after.fingerprint

    # SF-V with the teacher's guidance: its own name and cache; the teacher's rows and keys stay as they were
    config.eval.sfv_model = config.eval.teacher_model = str(model)
    plain = [(r, r.key(config)) for r in rows(config)]
    config.eval.sfv_guidance = True
    for (p, p_key), g in zip(plain, rows(config), strict=True):
        assert generation_settings(config, g).guided
        if g.sampler == "svd":
            assert g == p and g.key(config) == p_key
        else:
            assert g.name == "SF-V guided" and g.key(config) != p_key
            assert not generation_settings(eval_tiny.get_config(), p).guided


def test_bad_configs_fail_cleanly(tiny_pipeline_dirs, tiny_folder_dataset, tmp_path):
    from sfv_jax.configs import eval_tiny
    from sfv_jax.data.sources import DataConfigError
    from sfv_jax.evaluation import runner as evaluate

    config = eval_tiny.get_config()
    with pytest.raises(evaluate.EvalConfigError, match="nothing to evaluate"):
        evaluate.rows(config)
    config.eval.sfv_model = str(tmp_path)
    with pytest.raises(evaluate.EvalConfigError, match="sfv_model=.*model_index.json"):
        evaluate.rows(config)
    config.eval.sfv_model = str(tiny_pipeline_dirs[2])
    config.eval.sfv_steps = (5,)
    with pytest.raises(evaluate.EvalConfigError, match="sfv_steps: 5"):
        evaluate.rows(config)
    config.eval.sfv_steps = (1,)
    config.data.path = str(tiny_folder_dataset)
    config.data.num_frames = 40  # the dataset's 5 videos have 14-25 frames at 7 fps
    with pytest.raises(DataConfigError, match="num_videos=8.*only 0 videos of at least 40 frames"):
        evaluate.evaluate(config, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval" / "reference").exists() or not any((tmp_path / "eval" / "reference").rglob("*.json"))
