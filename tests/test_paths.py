"""No command deletes or replaces its inputs: an output that equals, contains or lies
inside an input is refused before anything is written, with or without --overwrite, symlinks resolved."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from sfv_jax.cli import build_dataset
from sfv_jax.cli import convert as convert_cli
from sfv_jax.cli import export as export_cli
from sfv_jax.configs import eval_tiny, tiny
from sfv_jax.data.sources import DataConfigError
from sfv_jax.evaluation import runner
from sfv_jax.paths import output_overlaps


def _digest(folder: Path) -> str:
    """A hash of every file's path and bytes under ``folder`` (what must not change)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_overlap_rules(tmp_path):
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    assert output_overlaps("--out", a, {"--src": a}).startswith(f"--out {a} is --src")
    assert "contains" in output_overlaps("--out", tmp_path, {"--src": a / "b"})
    assert "is inside" in output_overlaps("--out", a / "b" / "new", {"--src": a})
    assert output_overlaps("--out", tmp_path / "elsewhere", {"--src": a, "--other": None}) is None
    assert output_overlaps("--out", tmp_path / "ab", {"--src": a}) is None  # a prefix is not a parent
    os.symlink(a, tmp_path / "link")  # the same folder under another name
    assert "is --src" in output_overlaps("--out", tmp_path / "link", {"--src": a})
    assert "is inside" in output_overlaps("--out", tmp_path / "link" / "x", {"--src": a / "b" / ".."})


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_never_touches_its_source(tiny_pipeline_dirs, tmp_path, where, capsys):
    src = tiny_pipeline_dirs[1]
    before = _digest(src.parent)
    out = {"same": src, "parent": src.parent, "inside": src / "converted"}[where]
    assert convert_cli.main(["--src", str(src), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--src" in err and "nothing was written" in err
    assert _digest(src.parent) == before
    # the other direction: the converted folder exported back onto itself
    conv = tiny_pipeline_dirs[2]
    before = _digest(conv)
    assert convert_cli.main(["--to-diffusers", "--src", str(conv), "--out", str(conv), "--overwrite"]) == 2
    assert _digest(conv) == before


def test_build_dataset_never_touches_its_videos(tmp_path, capsys):
    videos = tmp_path / "d" / "vids"
    videos.mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"not really a video")
    (tmp_path / "d" / "keep.txt").write_text("precious")
    before = _digest(tmp_path / "d")
    args = ["--videos", str(videos), "--height", "16", "--width", "16", "--overwrite"]
    for out in (tmp_path / "d", videos, videos / "out"):
        assert build_dataset.main([*args, "--out", str(out)]) == 2
        assert "error: --out" in capsys.readouterr().err
        assert _digest(tmp_path / "d") == before
    (tmp_path / "file").write_text("x")
    assert build_dataset.main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_export_and_evaluation_outputs_stay_out_of_their_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = tiny.get_config()
    (run / "config.json").write_text(config.to_json_best_effort())
    assert export_cli.main(["--workdir", str(run), "--out", str(run / "export")]) == 2
    assert "is inside --workdir" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]

    ev = eval_tiny.get_config()
    ev.eval.sfv_model = str(tmp_path / "model")
    with pytest.raises(runner.EvalConfigError, match="--workdir .* contains --config.eval.sfv_model"):
        runner.evaluate(ev, tmp_path, progress=False)


def test_encode_dataset_output_stays_out_of_its_dataset(tmp_path):
    from sfv_jax.cli.encode_dataset import encode_dataset

    config = tiny.get_config()
    config.data.kind, config.data.path = "folder", str(tmp_path / "clips")
    with pytest.raises(DataConfigError, match="--out .* is inside --config.data.path"):
        encode_dataset(config, tmp_path / "clips" / "latents")
    assert not (tmp_path / "clips").exists()
    assert json.dumps(config.to_dict())  # untouched config


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    """--workdir naming a file: every command that writes a work folder says so (not with a traceback)."""
    from sfv_jax.cli import reproduce, toy_world
    from sfv_jax.paths import folder_problem

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert folder_problem("--workdir", afile) == f"--workdir {afile}: exists and is not a folder"
    assert folder_problem("--workdir", tmp_path / "new" / "deeper") is None
    assert toy_world.main(["--workdir", str(afile), "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model_index.json").write_text("{}")
    assert reproduce.main(["--workdir", str(afile), "--teacher", str(teacher)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    config = eval_tiny.get_config()
    with pytest.raises(runner.EvalConfigError, match="exists and is not a folder"):
        runner.evaluate(config, afile)
    assert afile.read_text() == "keep me" and not (tmp_path / "out").exists()
