"""One writer per output, staging that never leaks, the machine's failures as ``error:`` lines, and stop
signals honoured at once: a second command on an output another holds is refused naming the holder; a
full or read-only disk, a symlink or a file where a folder is wanted end in one line and exit 2 with
nothing half-written; staging folders of killed runs are removed by the next run (and nothing else is);
SIGTERM while the first training step compiles and SIGINT during a dataset build stop within seconds."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfv_jax import console, paths
from sfv_jax.cli import build_dataset
from sfv_jax.cli import convert as convert_cli
from sfv_jax.cli.encode_dataset import encode_dataset
from sfv_jax.configs import tiny
from sfv_jax.data import video_io
from sfv_jax.data.sources import DataConfigError
from sfv_jax.data.synthetic import synthetic_clip

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock on ``path`` (it prints ``held`` once it has it)."""
    code = (
        "import sys, time; from sfv_jax.paths import OutputLock\n"
        f"with OutputLock({str(path)!r}, '--out', command='sfv-test-holder'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_writer_names_it_and_is_taken_over_when_it_dies(tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(paths.OutputError, match=rf"--out {out}: in use by sfv-test-holder \(pid {holder.pid} on "):
            with paths.OutputLock(out, "--out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over, the old holder named
    with paths.OutputLock(out, "--out", command="second") as lock:
        assert lock.previous["pid"] == holder.pid and lock.previous["command"] == "sfv-test-holder"
    assert not (tmp_path / ".out.lock").exists()  # a clean exit removes the lock file


def test_commands_refuse_an_output_another_command_holds(tiny_unet_dirs, tmp_path, capsys):
    out = tmp_path / "converted"
    with paths.OutputLock(out, "--out", command="sfv-convert"):  # another open file: flock refuses it too
        assert convert_cli.main(["--src", str(tiny_unet_dirs["tiny_a"]), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: in use by sfv-convert (pid {os.getpid()}")
        (tmp_path / "videos").mkdir()
        args = ["--videos", str(tmp_path / "videos"), "--out", str(out), "--height", "8", "--width", "8"]
        assert build_dataset.main(args) == 2
        assert "in use by sfv-convert" in capsys.readouterr().err
    assert not out.exists()


def test_staging_names_are_unique_and_only_dead_runs_leftovers_are_removed(tiny_unet_dirs, tmp_path):
    out = tmp_path / "converted"
    assert paths.staging_name(out) != paths.staging_name(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".converted.staging-{host}-{dead.pid}-0123abcd"
    alive = tmp_path / f".converted.staging-{host}-{os.getpid()}-0123abcd"  # a live run's: kept
    other_host = tmp_path / f".converted.staging-{host}x-{dead.pid}-0123abcd"  # cannot be checked: kept
    users = tmp_path / ".converted.staging-notes"  # not a name staging_name makes: kept
    for p in (stale, alive, other_host, users):
        p.mkdir()
        (p / "f").write_text("x")
    assert convert_cli.main(["--src", str(tiny_unet_dirs["tiny_a"]), "--out", str(out)]) == 0
    assert not stale.exists() and alive.is_dir() and other_host.is_dir() and users.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".converted.staging")) == sorted(
        p.name for p in (alive, other_host, users)
    )


# ---------------------------------------------------------------------------------------- the machine's failures


def test_full_disk_is_found_before_the_converter_writes(tiny_unet_dirs, tmp_path, monkeypatch, capsys):
    real = paths.shutil.disk_usage
    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    out = tmp_path / "converted"
    assert convert_cli.main(["--src", str(tiny_unet_dirs["tiny_a"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path}") and "GB free on its file system" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging, no lock file


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR])
def test_environment_errors_become_one_line_and_temp_files_go(tmp_path, capsys, code):
    def write(tmp):
        tmp.write_text("half")
        raise OSError(code, os.strerror(code), str(tmp))

    def main(argv):
        paths.write_atomic(tmp_path / "config.json", write)
        return 0

    assert console.guarded(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and os.strerror(code) in err and errno.errorcode[code] in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "a bug, not the machine", "x")

    with pytest.raises(FileNotFoundError):  # an error of the code keeps its traceback
        console.guarded(bug, [])


def test_read_only_output_is_refused_before_any_work(tiny_unet_dirs, tmp_path, monkeypatch, capsys):
    """A read-only file system lets ``os.access`` say yes to root; the probe writes a byte to know."""
    real_open = open

    def read_only(file, *args, **kwargs):
        if ".sfv-probe-" in str(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    out = tmp_path / "converted"
    assert convert_cli.main(["--src", str(tiny_unet_dirs["tiny_a"]), "--out", str(out)]) == 2
    assert "Read-only file system" in capsys.readouterr().err
    (tmp_path / "videos").mkdir()
    args = ["--videos", str(tmp_path / "videos"), "--out", str(out), "--height", "8", "--width", "8"]
    assert build_dataset.main(args) == 2
    assert "Read-only file system" in capsys.readouterr().err and not out.exists()


def test_symlinked_or_file_outputs_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    args = ["--videos", str(tmp_path / "videos"), "--height", "8", "--width", "8", "--overwrite"]
    assert build_dataset.main([*args, "--out", str(link)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and (target / "keep").read_text() == "x"
    afile = tmp_path / "afile"
    afile.write_text("x")
    config = tiny.get_config()
    with pytest.raises(DataConfigError, match=f"--out {afile}: exists and is not a folder"):
        encode_dataset(config, afile, limit=2)
    with pytest.raises(DataConfigError, match="is a symbolic link"):
        encode_dataset(config, link, limit=2, overwrite=True)
    assert afile.read_text() == "x" and (target / "keep").read_text() == "x"


def test_memory_planner_refuses_a_mesh_it_cannot_simulate():
    cmd = [sys.executable, "-m", "sfv_jax.cli.memory", "--config", "tiny", "--mesh", "data=100000"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --mesh: 100,000 devices"), proc.stderr[-2000:]
    assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------------- signals


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    seen, deadline = [], time.time() + timeout
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen[-40:])
    raise AssertionError(f"{text!r} never logged:\n" + "".join(seen[-40:]))


def test_sigterm_while_the_first_step_compiles_ends_the_run_at_once(tmp_path):
    """The compile runs in XLA, where no Python handler runs until it returns (minutes at full size): the
    run must end within seconds, not after the compile and a step. The persistent compilation cache is off
    and the batch shape is one no other test compiles, so the signal lands mid-compile."""
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "sfv_jax.cli.train", "--config", "tiny", "--workdir", str(tmp_path / "run")]
    cmd += ["--config.data.micro_batch=3", "--config.total_steps=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, "compiling the steps", 600)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stopped_in = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM and stopped_in < 10, (proc.returncode, stopped_in)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_sigint_during_a_dataset_build_stops_it_and_removes_the_staging(tmp_path):
    videos = tmp_path / "videos"
    for i in range(12):
        video_io.write_video(videos / f"v{i}.mp4", synthetic_clip(i, 0, 60, 48, 64), fps=10)
    out = tmp_path / "built"
    cmd = [sys.executable, "-m", "sfv_jax.cli.build_dataset", "--videos", str(videos), "--out", str(out)]
    cmd += ["--height", "32", "--width", "32", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".built.staging-*")):  # the build has started writing
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        stopped_in = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT and stopped_in < 10, (proc.returncode, stopped_in, err[-2000:])
    assert "error: stopped by signal" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]  # no dataset, no staging; the lock released
