"""``python -m sfv_jax.cli.reproduce``: rows, size presets and bad flags (the tiny converted test
pipeline stands in for a teacher). The report itself, its grids and its resume are checked on the shipped
toy teacher in tests/test_toy_teacher.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfv_jax.cli import reproduce
from sfv_jax.evaluation import toy_protocol as tp
from sfv_jax.training.run_config import ConfigError, flat_hparams


def test_rows_and_selection():
    keys = [r.key for r in tp.all_rows()]
    assert keys[:8] == ["real", "vae", *(f"teacher_{s}" for s in tp.TEACHER_STEPS)]
    assert {"sfv_1", "sfv_2", "sfv_3", "sfv_spatial_1", "sfv_both_heads_1", "sfv_recon_only_1"} <= set(keys)
    assert [r.key for r in tp.select_rows(["teacher_25", "sfv"])] == ["teacher_25", "sfv_1", "sfv_2", "sfv_3"]
    assert all(r.run in tp.RUNS for r in tp.all_rows() if r.kind == "sfv")


def test_rows_choose_the_guidance():
    """``teacher`` keeps SVD's guidance 1 -> 3, ``teacher_unguided`` samples the teacher as SF-V samples (no
    classifier-free guidance), ``sfv_guided`` gives the toy default's generator the teacher's guidance."""
    seen = []

    class Pipe:
        def generate(self, images, seeds, settings):
            seen.append(settings)
            return [np.zeros((tp.FRAMES, tp.SIZE, tp.SIZE, 3), np.float32) for _ in images]

    images = np.zeros((2, tp.SIZE, tp.SIZE, 3), np.uint8)
    keys = ("teacher_25", "teacher_unguided_25", "sfv_1", "sfv_guided_1")
    for key in keys:
        (row,) = tp.select_rows([key])
        assert tp.generate(Pipe(), row, images, [0, 1]).shape == (2, tp.FRAMES, tp.SIZE, tp.SIZE, 3)
    got = [(s.sampler, s.num_inference_steps, s.guided, s.max_guidance_scale) for s in seen]
    assert got == [("svd", 25, True, 3.0), ("svd", 25, False, 1.0), ("sfv", 1, False, 3.0), ("sfv", 1, True, 3.0)]
    assert {r.run for r in tp.select_rows(["sfv_1", "sfv_guided_1"])} == {"sfv"}  # one training run for both


def test_every_run_overrides_the_toy_config():
    """Each SF-V run's overrides name existing keys of configs/toy_sfv.py and change them (a misspelt or
    no-op run would train the paper's setting under another name)."""
    base_config = reproduce.run_config("sfv", Path("t"), 2, None)
    assert (base_config.init_from, base_config.seed) == ("t", 2)
    base = flat_hparams(base_config)
    for name, overrides in tp.RUNS.items():
        config = reproduce.run_config(name, Path("t"), 2, 300)
        assert config.total_steps == 300
        flat = flat_hparams(config)
        for key, value in overrides.items():
            assert flat.get(key) == value, (name, key)  # flat_hparams leaves out None
        assert any(base.get(key) != value for key, value in overrides.items()) or name == "sfv", name  # None: absent


def test_a_run_with_a_start_trains_it_first_and_starts_from_its_export(tmp_path, monkeypatch):
    """``toy_protocol.RUN_STARTS``: ``sfv_cfg`` (the guidance objective) trains the toy default first and
    distils its export, for ``guidance_steps`` (``--guidance-steps``) where given; the start keeps ``steps``."""
    assert all(start in tp.RUNS and name in tp.RUNS for name, start in tp.RUN_STARTS.items())
    trained = []

    def fake_train(config, workdir):
        trained.append((Path(workdir).name, config.objective, config.init_from, config.total_steps))

    monkeypatch.setattr(reproduce.trainer, "train", fake_train)
    monkeypatch.setattr(reproduce.export, "export_run", lambda run, out: Path(out).mkdir(parents=True))
    teacher = tmp_path / "teacher"
    out = reproduce.train_run(tmp_path, "sfv_cfg", teacher, 2, 300, guidance_steps=100)
    assert out == tmp_path / "models" / "sfv_cfg"
    start = str(tmp_path / "models" / "sfv")
    assert trained == [("sfv", "sfv", str(teacher), 300), ("sfv_cfg", "guidance", start, 100)]


def test_size_presets():
    """``--quick`` / ``--demo`` resolve their defaults; explicit flags win. (The report, grids and resume are
    checked on the shipped teacher's report in tests/test_toy_teacher.py.)"""
    quick = reproduce.parse_args(["--workdir", "w", "--quick"])
    assert (quick.num_videos, quick.steps, quick.rows) == (8, 4, None)
    assert reproduce.parse_args(["--workdir", "w", "--quick", "--num-videos", "32"]).num_videos == 8
    demo = reproduce.parse_args(["--workdir", "w", "--demo"])
    assert (demo.num_videos, demo.steps, demo.guidance_steps, demo.rows) == (
        reproduce.DEMO["num_videos"],
        reproduce.DEMO["steps"],
        reproduce.DEMO["guidance_steps"],
        reproduce.DEMO["rows"],
    )
    assert reproduce.parse_args(["--workdir", "w", "--demo", "--rows", "real", "--steps", "7"]).rows == "real"
    assert reproduce.parse_args(["--workdir", "w", "--demo", "--guidance-steps", "5"]).guidance_steps == 5
    full = reproduce.parse_args(["--workdir", "w"])
    names = ("num_videos", "steps", "guidance_steps", "rows", "seed", "train_seed")
    assert [getattr(full, name) for name in names] == [256, None, None, None, 0, 0]
    # the side by side: SF-V's one step, then its guidance-distilled and guided ones where the rows have them
    columns = reproduce.side_by_side_columns(tp.select_rows(reproduce.DEMO["rows"].split(",")))
    assert columns == ["sfv_1", "sfv_cfg_1"]
    both = reproduce.side_by_side_columns(tp.select_rows(["sfv_guided_1", "sfv_1", "sfv_cfg_1"]))
    assert both == ["sfv_1", "sfv_cfg_1", "sfv_guided_1"]
    assert reproduce.side_by_side_columns(tp.select_rows(["sfv_guided_1", "teacher_1"])) == ["sfv_guided_1"]
    assert reproduce.side_by_side_columns(tp.select_rows(["teacher_1"])) == []


def test_train_seed_repeats_a_run_under_the_same_protocol():
    """``--train-seed`` defaults to ``--seed``; another value trains the runs with it (their config's seed, which
    a finished run's check compares) while the protocol keeps ``--seed``; the report's title says so."""
    assert reproduce.parse_args(["--workdir", "w", "--seed", "2"]).train_seed == 2
    args = reproduce.parse_args(["--workdir", "w", "--seed", "2", "--train-seed", "7"])
    assert (args.seed, args.train_seed) == (2, 7)
    assert reproduce.run_config("sfv", Path("/t"), args.train_seed, 300).seed == 7
    title = reproduce.report_markdown([], args, "cmd", 60.0).splitlines()[0]
    assert title == "# SF-V toy-scale reproduction (seed 2, 256 videos per row; SF-V runs trained with seed 7)"
    same = reproduce.parse_args(["--workdir", "w", "--seed", "2"])
    assert reproduce.report_markdown([], same, "cmd", 60.0).startswith("# SF-V toy-scale reproduction (seed 2, 256 ")


def test_report_table_has_the_colour_column_and_dashes_for_missing_values():
    """A row cached before the colour metric existed (no ``colour``) and a row without a conditioning frame
    (``frame0_psnr`` None) print "-" in their cells."""
    args = reproduce.parse_args(["--workdir", "w", "--seed", "2"])
    rows = [
        {
            "name": "real",
            "steps": 0,
            "fvd": 90.4,
            "motion": 0.965,
            "sharpness": 1.058,
            "colour": 1.0,
            "frame0_psnr": None,
        },
        {"name": "sfv", "steps": 1, "fvd": 1173.1, "motion": 1.045, "sharpness": 0.082, "frame0_psnr": 23.04},
    ]
    table = reproduce.report_markdown(rows, args, "cmd", 60.0)
    assert "| row | steps | FVD ↓ | motion | sharpness | colour | frame-0 PSNR (dB) |" in table
    assert "| real | 0 | 90.4 | 0.965 | 1.058 | 1.000 | - |" in table
    assert "| sfv | 1 | 1173.1 | 1.045 | 0.082 | - | 23.0 |" in table


def test_bad_flags(tiny_pipeline_dirs, tmp_path, capsys):
    teacher = str(tiny_pipeline_dirs[2])
    cases = [
        (["--teacher", teacher, "--rows", "nosuch"], "--rows: unknown row(s) ['nosuch']"),
        (["--teacher", str(tmp_path)], "not a pipeline folder"),
        (["--teacher", teacher, "--num-videos", "1"], "--num-videos=1: must be >= 2"),
        (["--teacher", teacher, "--guidance-steps", "0"], "--guidance-steps=0: must be >= 1"),
    ]
    for flags, message in cases:
        assert reproduce.main(["--workdir", str(tmp_path / "w"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert reproduce.main(["--workdir", str(tmp_path / "t" / "inside"), "--teacher", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "w").exists()


def test_a_rerun_that_would_mix_protocols_or_run_settings_is_refused(tmp_path):
    """Cached rows and exported runs are reused only under the settings they were made with: another seed,
    video count or teacher in the same workdir, or a finished run whose settings or steps differ from what
    the command asks for (a changed override or toy default), is refused naming what differs."""
    protocol = {"seed": 2, "num_videos": 256, "teacher": "/t"}
    reproduce.check_protocol(tmp_path, protocol)
    reproduce.check_protocol(tmp_path, protocol)  # the same protocol: accepted
    with pytest.raises(ConfigError, match=r"another protocol[\s\S]*seed: 2 -> 0"):
        reproduce.check_protocol(tmp_path, {**protocol, "seed": 0})

    train = tmp_path / "train" / "sfv"
    train.mkdir(parents=True)
    config = reproduce.run_config("sfv", Path("/t"), 2, 300)
    (train / "config.json").write_text(config.to_json_best_effort(indent=2))
    reproduce.check_trained_run(train, reproduce.run_config("sfv", Path("/t"), 2, 300))
    quiet = reproduce.run_config("sfv", Path("/t"), 2, 300, diagnostics=False)  # the main job's: the same run
    assert (quiet.heldout_every_steps, quiet.sample_every_steps) == (0, 0) and config.heldout_every_steps > 0
    reproduce.check_trained_run(train, quiet)
    for other, pattern in [
        (reproduce.run_config("sfv_spatial", Path("/t"), 2, 300), "disc.heads: 'temporal' -> 'spatial'"),
        (reproduce.run_config("sfv", Path("/t"), 3, 300), "seed: 2 -> 3"),
        (reproduce.run_config("sfv", Path("/t"), 2, 100), "total_steps: 300 -> 100"),
    ]:
        with pytest.raises(ConfigError, match="trained and exported with other settings") as e:
            reproduce.check_trained_run(train, other)
        assert pattern in str(e.value), str(e.value)
