"""The README's main job and the benchmarks run end to end (smoke runs; no timing is asserted)."""

from __future__ import annotations

import pytest

from sfv_jax import testing
from sfv_jax.bench import __main__ as bench
from sfv_jax.cli import demo
from sfv_jax.data import video_io


def test_demo_main_job(tmp_path, capsys):
    assert demo.main(["--workdir", str(tmp_path / "demo"), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "max|jax-torch|" in out and "OK" in out
    assert (tmp_path / "demo" / "flax_svd" / "sfv_jax.json").exists()
    frames, _ = video_io.read_video(tmp_path / "demo" / "sfv.mp4")
    assert frames.shape[0] == 5


def test_bench_unet_runs(capsys):
    assert (
        bench.main(["unet", "--config", "tiny_a", "--height", "64", "--width", "64", "--repeats", "1", "--warmup", "0"])
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("unet_flax_s=") and "ratio_flax_over_torch=" in last


def test_bench_pipeline_runs(capsys):
    assert (
        bench.main(
            [
                "pipeline",
                "--config",
                "tiny",
                "--height",
                "48",
                "--width",
                "40",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("pipeline_flax_s=") and "ratio_flax_over_torch=" in lines[-1]
    for stage in ("image_encoder", "vae_encode", "unet", "vae_decode"):
        assert any(line.startswith(f"[bench] {stage} ") for line in lines), stage


def test_commands_name_the_dev_extras_when_torch_is_missing(monkeypatch, capsys):
    real = testing.importlib.util.find_spec
    monkeypatch.setattr(
        testing.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    for run in (lambda: bench.main(["unet", "--config", "tiny_a"]), lambda: demo.main(["--workdir", "unused"])):
        with pytest.raises(SystemExit) as exc:
            run()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "torch not installed" in err and ".[dev]" in err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--workdir", "W", "--config.disc.nosuch=1"], "error: --config.disc.nosuch: the config has no key 'nosuch'"),
        (["--workdir", "W", "--config.total_steps=abc"], "error: flag --config.total_steps=abc: invalid literal"),
        ([], "error: flag --workdir=None: Flag --workdir must have a value"),
    ],
)
def test_command_line_mistakes_are_errors_not_tracebacks(tmp_path, flags, message):
    """A --config override of a key the config lacks, a bad value, a missing flag: ``error: ...``, exit 2,
    no traceback, nothing written (not a traceback for the unknown key, not absl's FATAL line for the others)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    argv = [a.replace("W", str(tmp_path / "run")) for a in flags]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "sfv_jax.cli.train", "--config", "tiny", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr and "FATAL" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_debug_flag_adds_the_traceback(tmp_path):
    """--debug (any command) prints the traceback above the error line; without it only the line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "sfv_jax.cli.convert",
        "--src",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("SFV_DEBUG", None)
    plain = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    debug = subprocess.run([*cmd, "--debug"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")
    assert "Traceback (most recent call last)" in debug.stderr and "CheckpointError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
