"""Memory planner: does a training config fit, per device, on a given mesh? No weights, no accelerator.

    python -m sfv_jax.tools.memory --config configs/sfv_svd.py --mesh fsdp=8
    python -m sfv_jax.tools.memory --config configs/sfv_svd.py --mesh data=2,fsdp=4 --config.model.remat_policy=dots

It builds the run's layout (modules, shardings) from the config with ``jax.eval_shape`` only, compiles
the four jitted train steps (generator gradients / update, discriminator gradients / update) ahead of
time on abstract inputs that carry their shardings, and reads each executable's memory analysis:
outputs, donated (aliased) buffers and XLA's temporaries, per device. Everything the trainer keeps
between steps (parameters, EMA, optimizer states, frozen backbone, the batch) is *resident*; a step's
peak is resident + the gradients it receives (update steps) + outputs - aliased + temporaries (an
executable's own argument size leaves out the resident arrays it does not read); the run's peak is the
largest. The last line is
``peak_bytes_per_device=<int>``.

Devices: the accelerators present if there are enough of them; otherwise the mesh is simulated with
that many CPU devices, compiled with XLA:CPU's memory-minimising scheduler (XLA's buffer assignment is
shared by its backends, but GPU kernels choose other fusions and workspaces: treat a CPU figure as an
estimate and leave headroom); cuDNN attention, which a CPU cannot compile, is planned as the chunked
attention (both keep O(tokens) memory, forward and backward). A config
without ``init_from`` or model configs is planned with SVD's own architecture. The frozen VAE and image
encoder used for on-the-fly encoding are listed separately (they live on each process's first device).
Compiling the full-size steps on a CPU takes minutes; progress is printed.
"""

from __future__ import annotations

import math
import os
import sys
import time


def _devices_needed(argv: list[str]) -> int | None:
    """The mesh size from --mesh, read before JAX starts (to simulate that many CPU devices)."""
    for i, a in enumerate(argv):
        spec = (
            a.split("=", 1)[1]
            if a.startswith("--mesh=")
            else argv[i + 1]
            if a == "--mesh" and i + 1 < len(argv)
            else None
        )
        if spec:
            sizes = [
                int(p.split("=")[1]) for p in spec.split(",") if "=" in p and p.split("=")[1].lstrip("-").isdigit()
            ]
            if sizes and all(s > 0 for s in sizes):
                return math.prod(sizes)
    return None


# The planner simulates the mesh on that many CPU devices when no accelerator has enough; XLA reads the
# device count when JAX starts, so this runs before this module imports JAX (as a command: ``sfv-memory``
# or ``python -m sfv_jax.tools.memory``; imported into a running JAX it changes nothing).
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "sfv-memory":
    _n = _devices_needed(sys.argv)
    if _n and "jax" not in sys.modules:
        _flags = os.environ.get("XLA_FLAGS", "").split()
        _flags = [f for f in _flags if not f.startswith("--xla_force_host_platform_device_count=")]
        _flags.append(f"--xla_force_host_platform_device_count={_n}")
        # XLA:CPU's default scheduler trades memory for concurrency; a GPU's does not
        if not any(f.startswith("--xla_cpu_enable_concurrency_optimized_scheduler") for f in _flags):
            _flags.append("--xla_cpu_enable_concurrency_optimized_scheduler=false")
        os.environ["XLA_FLAGS"] = " ".join(_flags)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sfv_jax import console  # noqa: E402  (after the device simulation above; before TensorFlow)
from sfv_jax.models.build import abstract_params  # noqa: E402
from sfv_jax.parallel import sharding  # noqa: E402
from sfv_jax.training import trainer  # noqa: E402
from sfv_jax.training.discriminator import backbone_subset  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("mesh", None, "mesh as AXIS=SIZE[,AXIS=SIZE] over data, fsdp, tensor (default: the config's)")
flags.DEFINE_float("device_gb", 80.0, "device memory to compare the peak with, in GB (1e9 bytes)")
flags.mark_flags_as_required(["config"])

GB = 1e9


def _shard_bytes(abstract) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(abstract):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def plan_memory(config, mesh_spec: str | None = None, log=print) -> dict:
    """Compile the train steps for ``config`` on the mesh and return the per-device memory figures."""
    if mesh_spec:
        config.mesh.update(sharding.parse_mesh(mesh_spec))
    n = math.prod(s for s in config.mesh.to_dict().values() if s > 0)
    devices = jax.devices()
    if any(s == -1 for s in config.mesh.to_dict().values()):
        n = len(devices)
    if len(devices) < n:
        devices = jax.devices("cpu")
    if len(devices) < n:
        raise sharding.ShardingError(
            f"--mesh needs {n} devices; {len(devices)} present (set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n} before JAX starts)"
        )
    notes = []
    if devices[0].platform == "cpu":
        notes.append("XLA:CPU compile with its memory-minimising scheduler (estimates of a GPU compile)")
        if config.model.get("attention_impl") == "cudnn":  # not compilable here: the same O(tokens) memory
            config.model.attention_impl = "chunked"
            notes.append("cuDNN flash attention planned as 'chunked' (both keep O(tokens) memory)")
    plan = sharding.Plan.from_config(config, devices[:n])
    unet, vae, clip = trainer.build_modules(config, svd_defaults=True)
    lay = trainer.make_layout(config, plan, unet, vae, clip)
    steps = lay.steps(config)
    state, batch = lay.abstract_state, lay.abstract_batch(config)
    backbone = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        backbone_subset(state.unet_params()) if lay.backbone_shardings else {},
        lay.backbone_shardings,
    )
    log(
        f"mesh {plan.describe()} on {devices[0].platform}; {lay.global_micro} samples per accumulation step x "
        f"{config.data.accum_steps}; {config.data.num_frames} x {config.data.height} x {config.data.width}; "
        f"compute {config.model.dtype}, remat {config.model.remat_policy}; objective {config.objective}, "
        f"trainable {config.trainable}"
    )
    resident = {
        "generator": _shard_bytes(state.generator),
        "frozen": _shard_bytes(state.frozen),
        "ema": _shard_bytes(state.ema),
        "generator_opt": _shard_bytes(state.gen_opt),
        "heads": _shard_bytes(state.heads),
        "heads_opt": _shard_bytes(state.disc_opt),
        "backbone": _shard_bytes(backbone),
        "batch": _shard_bytes(batch),
    }
    out = {"mesh": plan.shape, "platform": devices[0].platform, "resident": resident, "steps": {}, "notes": notes}
    for note in notes:
        log(f"note: {note}")
    g_grads_abs = jax.eval_shape(steps.g_grads, state, batch, backbone)
    calls = {
        "g_grads": (steps.g_grads, (state, batch, backbone)),
        "g_update": (steps.g_update, (state, *_with(g_grads_abs, lay.state_shardings.generator, plan))),
    }
    if steps.d_grads is not None:  # SF-V's discriminator step
        d_grads_abs = jax.eval_shape(steps.d_grads, state, batch, backbone)
        calls["d_grads"] = (steps.d_grads, (state, batch, backbone))
        calls["d_update"] = (steps.d_update, (state, *_with(d_grads_abs, lay.state_shardings.heads, plan)))
    resident_total = sum(resident.values())
    carried = {name: _shard_bytes(args[1]) if name.endswith("update") else 0 for name, (_, args) in calls.items()}
    for name, (fn, args) in calls.items():
        t0 = time.time()
        log(f"compiling {name} ...")
        with plan.context():
            compiled = fn.lower(*args).compile()
        m = compiled.memory_analysis()
        fig = {
            "resident": resident_total,
            "gradients_in": carried[name],
            "outputs": int(m.output_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes),
            "temporaries": int(m.temp_size_in_bytes),
            "code": int(m.generated_code_size_in_bytes),
        }
        fig["peak"] = fig["resident"] + fig["gradients_in"] + fig["outputs"] - fig["aliased"] + fig["temporaries"]
        out["steps"][name] = fig
        log(
            f"  {name}: peak {fig['peak'] / GB:.3f} GB (temporaries {fig['temporaries'] / GB:.3f}) "
            f"compiled in {time.time() - t0:.0f} s"
        )
    frozen = abstract_params(vae), abstract_params(clip)
    out["frozen_encoders_first_device"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
    out["peak_bytes_per_device"] = max(f["peak"] for f in out["steps"].values())
    return out


def _with(grads_and_metrics, grad_shardings, plan):
    grads, metrics = grads_and_metrics
    grads = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), grads, grad_shardings)
    metrics = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=plan.replicated), metrics)
    return grads, metrics


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        r = plan_memory(FLAGS.config, FLAGS.mesh)
    except (trainer.ConfigError, sharding.ShardingError) as e:
        return console.fail(e)
    print(
        "resident per device (GB): "
        + ", ".join(f"{k} {v / GB:.3f}" for k, v in r["resident"].items())
        + f"; total {sum(r['resident'].values()) / GB:.3f}"
    )
    print(
        f"frozen VAE + image encoder (on-the-fly encoding, first device of each process): "
        f"{r['frozen_encoders_first_device'] / GB:.2f} GB"
    )
    cols = ("resident", "gradients_in", "outputs", "aliased", "temporaries", "peak")
    print(f"{'step':10s}" + "".join(f"{c:>14s}" for c in cols) + "  (GB per device)")
    for name, f in r["steps"].items():
        print(f"{name:10s}" + "".join(f"{f[c] / GB:14.3f}" for c in cols))
    peak = r["peak_bytes_per_device"]
    verdict = "fits" if peak <= FLAGS.device_gb * GB else "does NOT fit"
    print(f"peak per device {peak / GB:.2f} GB: {verdict} in {FLAGS.device_gb:g} GB ({r['platform']} compile)")
    print(f"peak_bytes_per_device={peak}")
    return 0


def run() -> None:
    """The ``sfv-memory`` console script."""
    console.run_absl(main)


if __name__ == "__main__":
    run()
