"""Sharded training on 8 virtual CPU devices: sharded steps equal single-device steps, large
leaves really are split, checkpoints move between meshes, two processes joined by jax.distributed train
like one. The device count is fixed when JAX starts, so the multi-device work runs in subprocesses
(tests/sharded_worker.py, and the training CLI); this process compares their outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_time_bound_env

from sfv_jax.parallel import sharding

REPO = Path(__file__).resolve().parents[1]
MESHES = ("data=2,fsdp=4",)  # data and fsdp axes together: batch over 8 devices, weights over 4
TOL = 1e-5


# Every subprocess here runs XLA:CPU with the memory planner's scheduler flag (scheduling only: the
# same arithmetic), so that the worker and the planner compile identical programs and find each other's
# in the shared compilation cache (conftest); the device count is not part of the cache key. The two
# training processes joined by jax.distributed compile programs of their own (measured: each compiles
# the generator gradient again, 45 s beside the other). And at XLA's usual -O2, not conftest's -O0:
# these steps carry 16 samples, and running them is most of their cost (the tiny generator gradient of
# 8 samples on one device, 2 cores shared with another job: 38.7 s at -O0 against 2.3 s at -O2,
# compiling in 20 s against 22 s).
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _env(devices: int | None = None, **extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        **extra,
        "XLA_FLAGS": run_time_bound_env(devices, SCHEDULER_FLAG)["XLA_FLAGS"],
    }


def _tree_rel(got: dict, want: dict, prefix: str) -> float:
    """max |got - want| / max |want| over the float leaves whose keys start with ``prefix``. The
    discriminator's accuracies and pair ranks (``d_acc_*``, ``d_rank_*``: fractions of logits, or of
    real / fake pairs, on the right side of 0) are left out: step functions of the logits, one within
    round-off of 0 moves them by a whole share, whatever the sharding; the logits they count are compared
    through ``d_real_*`` / ``d_fake_*`` and the margins."""
    keys = [
        k
        for k in want
        if k.startswith(prefix) and want[k].dtype.kind == "f" and "d_acc_" not in k and "d_rank_" not in k
    ]
    assert keys, prefix
    num = max(np.abs(got[k].astype(np.float64) - want[k]).max() for k in keys)
    return float(num / max(np.abs(want[k].astype(np.float64)).max() for k in keys))


# the tests that read the worker's output, or reuse its compiled programs, run on one xdist worker
# (``--dist loadgroup``), in this file's order: the worker runs once, first
ON_WORKER = pytest.mark.xdist_group("sharded_worker")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sharded_worker.py"), str(out), *MESHES],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = ("single", *MESHES, *(f"{m}_replay" for m in MESHES))
    names += ("diffusion_single", f"diffusion_{MESHES[-1]}", f"diffusion_{MESHES[-1]}_replay")
    arrays = {name: dict(np.load(out / f"{name}.npz")) for name in names}
    return arrays, json.loads((out / "report.json").read_text())


@ON_WORKER
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_single_device(worker, mesh):
    """One generator + one discriminator step (2 accumulation steps of 8 samples): losses, gradients,
    updated parameters, EMA and optimizer accumulators equal the single-device step to <= 1e-5
    (tree-relative, fp32)."""
    arrays, _ = worker
    want, got = arrays["single"], arrays[mesh]
    for prefix in ("metrics", "g_grads", "d_grads", "state.generator", "state.ema", "state.heads"):
        err = _tree_rel(got, want, prefix)
        assert err <= TOL, (mesh, prefix, err)
    for opt in ("state.gen_opt[0].mu", "state.disc_opt[0].mu"):  # SM3's squared-gradient accumulators
        assert _tree_rel(got, want, opt) <= TOL, (mesh, opt)
    # SM3's momentum holds *normalised* updates g / sqrt(acc): per row / column it divides the
    # gradients' round-off (1e-6 of the largest gradient above) by that row's own scale, so it is not
    # comparable across two runs at 1e-5. The sharded update itself (its per-dimension maxima reduce
    # across shards) is checked exactly: the whole sharded state equals the single-device update
    # applied to the sharded run's own gradients.
    replayed = arrays[f"{mesh}_replay"]
    for prefix in ("state.generator", "state.ema", "state.heads", "state.gen_opt", "state.disc_opt"):
        err = _tree_rel(got, replayed, prefix)
        assert err <= TOL, (mesh, "replay", prefix, err)
    assert int(got["state.step"]) == int(want["state.step"]) == 1


@ON_WORKER
def test_sharded_diffusion_step_equals_single_device(worker):
    """The diffusion objective, temporal layers only (AdamW with clipping and warm-up, per-sample noise
    augmentation): loss, gradients and, through the replay, the sharded update equal one device's
    (<= 1e-5); the frozen parameters are untouched bitwise; no discriminator state."""
    arrays, _ = worker
    mesh = MESHES[-1]
    want, got, replayed = (arrays[f"diffusion_{n}"] for n in ("single", mesh, f"{mesh}_replay"))
    for prefix in ("metrics", "g_grads"):
        assert _tree_rel(got, want, prefix) <= TOL, (prefix, _tree_rel(got, want, prefix))
    # AdamW's first step is g / |g| per element: round-off in near-zero gradients flips whole updates,
    # so the update is checked by the replay (the single-device update on the sharded gradients)
    for prefix in ("state.generator", "state.ema", "state.gen_opt"):
        err = _tree_rel(got, replayed, prefix)
        assert err <= TOL, ("replay", prefix, err)
    frozen = [k for k in want if k.startswith("state.frozen")]
    assert frozen and all(np.array_equal(got[k], want[k]) for k in frozen)
    assert not [k for k in want if k.startswith(("state.heads", "d_grads"))]
    assert int(got["state.step"]) == 1


@ON_WORKER
def test_large_leaves_are_sharded(worker):
    """Every state leaf above the threshold holds 1/4 of its bytes per device with data=2 x fsdp=4: split
    over the fsdp axis, replicated over the data axis."""
    _, report = worker
    for mesh, fsdp in (("data=2,fsdp=4", 4),):
        leaves = report["meshes"][mesh]["large_leaves"]
        assert len(leaves) > 400, (mesh, len(leaves))
        bad = [(name, total, dev) for name, total, dev in leaves if dev * fsdp != total]
        assert not bad, (mesh, bad[:5])


@ON_WORKER
def test_checkpoint_restores_onto_another_mesh(worker):
    """A checkpoint saved on one device restores onto data=2 x fsdp=4 with the same values and the mesh's
    shardings."""
    _, report = worker
    assert report["restore"] == {"single->data=2,fsdp=4": {"values_equal": True, "shardings_match": True}}


def test_mesh_config_errors():
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.resolve_mesh_shape({"data": 1, "fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(sharding.ShardingError, match="needs 6 devices, 8 are present"):
        sharding.resolve_mesh_shape({"data": 2, "fsdp": 3}, 8)
    with pytest.raises(sharding.ShardingError, match="at most one axis -1"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(sharding.ShardingError, match="AXIS=SIZE"):
        sharding.parse_mesh("pipeline=2")


def test_param_specs_follow_rules_and_divisibility():
    P, rules, mesh = jax.sharding.PartitionSpec, dict(sharding.DEFAULT_RULES), {"data": 1, "fsdp": 8, "tensor": 1}

    def spec(names, shape, **kw):
        return sharding.leaf_spec(names, shape, rules, mesh, min_shard_size=16, **kw)

    assert spec(("embed", "mlp"), (320, 1280)) == P("fsdp", None)
    assert spec(("kernel_h", "kernel_w", "conv_in", "conv_out"), (3, 3, 320, 4)) == P(None, None, "fsdp", None)
    assert spec(("kernel_h", "kernel_w", "conv_in", "conv_out"), (3, 3, 320, 4), fsdp_fallback=False) == P(
        None, None, None, None
    )  # conv_out 4 does not split 8 ways
    assert spec(("norm",), (8,)) == P()  # below min_shard_size
    assert spec(("embed", "embed_out"), (64, 64)) == P("fsdp", None)  # a mesh axis is used once
    assert sharding.leaf_spec(("embed", "mlp"), (64, 128), rules, {"data": 8}, 16) == P(None, None)  # no fsdp axis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@ON_WORKER  # after the worker: it compares with the worker's step on the same mesh
def test_two_processes_train_like_one(tmp_path, worker):
    """2 processes x 4 devices (jax.distributed, local coordinator) run one training step of the CLI on
    mesh data=2 x fsdp=4, each process loading only its rows of the global batch, and end with the state
    of the sharded worker's one-process, 8-device step on the same mesh, initial state and batch
    (<= 1e-5); both processes then sample from the sharded EMA (gathered), process 0 writes it."""
    arrays, _ = worker
    want = arrays["data=2,fsdp=4"]
    flags = [
        "--config",
        "configs/tiny.py",
        "--config.total_steps=1",
        "--config.sample_every_steps=1",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.sharding.min_shard_size=1024",
    ]
    cmd = [sys.executable, "-m", "sfv_jax.cli.train", *flags]
    port = _free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [*cmd, "--workdir", str(tmp_path / "multi")],
            cwd=REPO,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        )
        for i, log in enumerate(logs)
    ]
    for p in procs:
        p.wait(timeout=1200)
    logs = [log.read_text() for log in logs]
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, (i, log[-3000:])
    assert "process 1 of 2" in logs[1] and "mesh data=2 x fsdp=4 x tensor=1 (8 devices)" in logs[0]
    assert all("waiting for the other processes" in log for log in logs)  # compiled, then the barrier
    # only process 0 writes the summary, TensorBoard events and the sample
    assert (tmp_path / "multi" / "samples" / "step_0000001.mp4").is_file()
    summary = json.loads((tmp_path / "multi" / "train_summary.json").read_text())
    assert summary["step"] == 1 and summary["skipped_updates"] == 0
    from sfv_jax.configs import tiny
    from sfv_jax.training.checkpoints import checkpoint_manager, restore
    from sfv_jax.training.layout import build_modules, make_layout

    config = tiny.get_config()
    one = sharding.Plan(sharding.make_mesh({}, jax.local_devices()[:1]))
    like = make_layout(config, one, *build_modules(config)).abstract_state
    state, meta = restore(checkpoint_manager(tmp_path / "multi"), like)
    assert meta["step"] == 1 and meta["data_position"] == 8 * 2, meta  # 8 devices x accum 2
    got = {"state" + jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for field in ("generator", "ema", "heads"):
        err = _tree_rel(got, want, f"state.{field}")
        assert err <= TOL, (field, err)


@ON_WORKER  # after the worker: the same data=2 x fsdp=4 programs
def test_memory_planner_cli():
    """The planner compiles the tiny steps for data=2 x fsdp=4 on simulated devices and ends with the peak."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfv_jax.cli.memory",
            "--config",
            "configs/tiny.py",
            "--mesh",
            "data=2,fsdp=4",
            "--config.sharding.min_shard_size=1024",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("peak_bytes_per_device=")
    peak = int(lines[-1].split("=")[1])
    assert "mesh data=2 x fsdp=4 x tensor=1 (8 devices)" in proc.stdout + proc.stderr
    table = {  # resident .. peak (GB), then FLOPs ("-": XLA:CPU reports none) and compile seconds
        ln.split()[0]: [float(v) for v in ln.split()[1:7]]
        for ln in lines
        if ln.split()[0] in ("g_grads", "g_update", "d_grads", "d_update")
    }
    assert len(table) == 4 and all(row[-1] > 0 for row in table.values())
    assert abs(max(row[-1] for row in table.values()) * 1e9 - peak) < 1e6  # the table's GB, rounded
    bad = subprocess.run(
        [sys.executable, "-m", "sfv_jax.cli.memory", "--config", "configs/tiny.py", "--mesh", "pipeline=2"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "AXIS=SIZE" in bad.stderr, bad.stderr[-2000:]
