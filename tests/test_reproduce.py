"""``python -m sfv_jax.reproduce`` (issue 17) at smoke size: rows, report, grids, resume, bad flags. The
teacher here is the tiny converted test pipeline (random weights): this checks the machinery only;
whether SF-V works is the report's job on the toy teacher."""

from __future__ import annotations

import json

import numpy as np

from sfv_jax import reproduce
from sfv_jax.data import video_io
from sfv_jax.evaluation import toy_protocol as tp


def test_rows_and_selection():
    keys = [r.key for r in tp.all_rows()]
    assert keys[:8] == ["real", "vae", *(f"teacher_{s}" for s in tp.TEACHER_STEPS)]
    assert {"sfv_1", "sfv_2", "sfv_3", "sfv_spatial_1", "sfv_temporal_1", "sfv_recon_only_1"} <= set(keys)
    assert [r.key for r in tp.select_rows(["teacher_25", "sfv"])] == ["teacher_25", "sfv_1", "sfv_2", "sfv_3"]
    assert all(r.run in tp.RUNS for r in tp.all_rows() if r.kind == "sfv")


def test_quick_report_and_resume(tiny_pipeline_dirs, tmp_path, capsys):
    teacher, work = tiny_pipeline_dirs[2], tmp_path / "repro"
    argv = ["--workdir", str(work), "--teacher", str(teacher), "--quick", "--num-videos", "3"]
    assert reproduce.main([*argv, "--rows", "real,teacher_1"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert report["seed"] == 0 and report["num_videos"] == 3
    assert [(r["name"], r["steps"]) for r in report["rows"]] == [("real", 0), ("teacher", 1)]
    for r in report["rows"]:
        assert np.isfinite(r["fvd"]) and r["motion"] > 0 and r["sharpness"] > 0
    assert report["rows"][0]["frame0_psnr"] is None and np.isfinite(report["rows"][1]["frame0_psnr"])
    md = (work / "report.md").read_text()
    assert "| teacher | 1 |" in md and "--rows real,teacher_1" in md
    grid, _ = video_io.read_video(work / "grids" / "teacher_1.png")
    assert grid.shape == (1, 3 * 32 + 2, 14 * 32 + 13, 3)
    # a killed run (one row's result missing): the rerun computes only that row, with the same numbers
    mtime = (work / "rows" / "real.json").stat().st_mtime_ns
    (work / "rows" / "teacher_1.json").unlink()
    capsys.readouterr()
    assert reproduce.main([*argv, "--rows", "real,teacher_1"]) == 0
    out = capsys.readouterr().out
    assert "[reproduce] teacher_1:" in out and "[reproduce] real:" not in out
    assert (work / "rows" / "real.json").stat().st_mtime_ns == mtime
    again = json.loads((work / "report.json").read_text())["rows"]
    assert again[1]["fvd"] == report["rows"][1]["fvd"] and again[1]["motion"] == report["rows"][1]["motion"]


def test_bad_flags(tiny_pipeline_dirs, tmp_path, capsys):
    teacher = str(tiny_pipeline_dirs[2])
    cases = [
        (["--teacher", teacher, "--rows", "nosuch"], "--rows: unknown row(s) ['nosuch']"),
        (["--teacher", str(tmp_path)], "not a pipeline folder"),
        (["--teacher", teacher, "--num-videos", "1"], "--num-videos=1: must be >= 2"),
    ]
    for flags, message in cases:
        assert reproduce.main(["--workdir", str(tmp_path / "w"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert reproduce.main(["--workdir", str(tmp_path / "t" / "inside"), "--teacher", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "w").exists()
