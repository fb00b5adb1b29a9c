"""Memory planner: does a training config fit, per device, on a given mesh? No weights, no accelerator.

    sfv-memory --config sfv_svd --target h100 --mesh fsdp=8          # XLA:GPU's own figures, 8 H100s
    sfv-memory --config sfv_svd --target v5p --mesh fsdp=8           # libtpu's, a v5p-8 slice (+ FLOPs)
    sfv-memory --config sfv_svd --target h100 --sampler              # SF-V's one step, 1024x576x14, one GPU
    sfv-memory --config sfv_svd --target h100 --sampler --config.sample.sfv_guidance=True   # ... guided
    python -m sfv_jax.cli.memory --config configs/sfv_svd.py --mesh fsdp=8     # XLA:CPU estimate

``--target NAME`` (h100, h200, a100, v5p, v6e, v5e: :mod:`sfv_jax.parallel.targets`) compiles the steps
for that accelerator on this host, without one (the ``targets`` extra installs the compilers); the device
memory to compare with is the target's. A mesh axis of -1 (the configs' default) spans one host of the
target.

It builds the run's layout (modules, shardings) from the config with ``jax.eval_shape`` only, compiles
the jitted train steps (generator gradients / update, discriminator gradients / update, and SF-V's
held-out grip when ``heldout_every_steps`` is on) ahead of time on abstract inputs that carry their
shardings, and reads each executable's memory analysis: outputs, donated (aliased) buffers and XLA's
temporaries, per device. Everything the trainer keeps between steps (parameters, EMA, optimizer states,
frozen backbone, the batch, the grip's clips) is *resident*; a step's peak is resident + the gradients it
receives (update steps) + outputs - aliased + temporaries (an executable's own argument size leaves out
the resident arrays it does not read); the run's peak is the largest. The last line is
``peak_bytes_per_device=<int>``.

Devices without ``--target``: the accelerators present if there are enough of them; otherwise the mesh
is simulated with that many CPU devices, compiled with XLA:CPU's memory-minimising scheduler (XLA's
buffer assignment is shared by its backends, but GPU kernels choose other fusions and workspaces: treat a
CPU figure as an estimate and leave headroom; attention that prefers cuDNN compiles as the chunked
attention there, both O(tokens) memory). A config
without ``init_from`` or model configs is planned with SVD's own architecture. The frozen VAE and image
encoder used for on-the-fly encoding are listed separately (they live on each process's first device).
Compiling the full-size steps on a CPU takes minutes; progress is printed.
"""

from __future__ import annotations

import json
import math
import os
import sys

from sfv_jax.parallel import targets  # plain data, no JAX: usable before JAX starts


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


def _target_given(argv: list[str]) -> bool:
    return any(a == "--target" or a.startswith("--target=") for a in argv)


# The planner simulates the mesh on that many CPU devices when no accelerator has enough; XLA reads the
# device count when JAX starts, so this runs before this module imports JAX (as a command: ``sfv-memory``
# or ``python -m sfv_jax.cli.memory``; imported into a running JAX it changes nothing). With --target,
# JAX runs on the CPU and the target's compiler does the work (no simulated devices needed).
# The most devices a mesh may have: simulated CPU devices are real XLA devices, each with its threads and
# buffers (100,000 of them take minutes to create before failing); a target's are a description.
MAX_SIMULATED_DEVICES = 512
MAX_TARGET_DEVICES = 16384


def mesh_size_problem(n: int | None, target: bool) -> str | None:
    """The error for a ``--mesh`` of ``n`` devices beyond what the planner can simulate, else None."""
    limit = MAX_TARGET_DEVICES if target else MAX_SIMULATED_DEVICES
    if n is None or n <= limit:
        return None
    how = "a target's topology" if target else "CPU devices simulated without --target (use --target for more)"
    return f"--mesh: {n:,} devices; the planner takes at most {limit:,} ({how})"


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "sfv-memory":
    _n = _devices_needed(sys.argv)
    if _problem := mesh_size_problem(_n, _target_given(sys.argv)):
        print(f"error: {_problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    if _target_given(sys.argv) and "jax" not in sys.modules:
        targets.prepare_environment()
    elif _n and "jax" not in sys.modules:
        _flags = os.environ.get("XLA_FLAGS", "").split()
        _flags = [f for f in _flags if not f.startswith("--xla_force_host_platform_device_count=")]
        _flags.append(f"--xla_force_host_platform_device_count={_n}")
        # XLA:CPU's default scheduler trades memory for concurrency; a GPU's does not
        if not any(f.startswith("--xla_cpu_enable_concurrency_optimized_scheduler") for f in _flags):
            _flags.append("--xla_cpu_enable_concurrency_optimized_scheduler=false")
        os.environ["XLA_FLAGS"] = " ".join(_flags)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sfv_jax import console, paths  # noqa: E402  (after the device simulation above; before TensorFlow)
from sfv_jax.parallel import sharding  # noqa: E402
from sfv_jax.training.memory_plan import GB, plan_memory, plan_sampler  # noqa: E402
from sfv_jax.training.run_config import ConfigError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("mesh", None, "mesh as AXIS=SIZE[,AXIS=SIZE] over data, fsdp, tensor (default: the config's)")
flags.DEFINE_enum("target", None, list(targets.TARGETS), "compile for this accelerator (sfv_jax.parallel.targets)")
flags.DEFINE_list(
    "steps",
    None,
    "compile only these programs (g_grads, g_update, d_grads, d_update, heldout: SF-V's held-out grip; "
    "default all that the run executes)",
)
flags.DEFINE_float(
    "device_gb", None, "device memory to compare the peak with, in GB (1e9 bytes; default: the target's, else 80)"
)
flags.DEFINE_bool(
    "sampler",
    False,
    "compile the pipeline's UNet stage on one device instead of the train steps: the config's sampler "
    "(sfv: SF-V, sample.steps single forwards; diffusion: the teacher, sample.steps guided Euler steps)",
)
flags.DEFINE_string("json", None, "also write the figures to this JSON file (what sfv-targets collects)")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if FLAGS.sampler:
            r = plan_sampler(FLAGS.config, target=FLAGS.target)
        else:
            r = plan_memory(FLAGS.config, FLAGS.mesh, target=FLAGS.target, programs=FLAGS.steps)
    except (ConfigError, sharding.ShardingError, targets.TargetError) as e:
        return console.fail(e)
    device_gb = FLAGS.device_gb or (targets.get(FLAGS.target).memory_gb if FLAGS.target else 80.0)
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
    print(f"{'step':10s}" + "".join(f"{c:>14s}" for c in cols) + "  (GB per device)   TFLOP/step  compile s")
    for name, f in r["steps"].items():
        tflops = f"{f['flops'] / 1e12:12.2f}" if f["flops"] is not None else f"{'-':>12s}"
        print(f"{name:10s}" + "".join(f"{f[c] / GB:14.3f}" for c in cols) + f"   {tflops} {f['compile_s']:10.0f}")
    peak = r["peak_bytes_per_device"]
    verdict = "fits" if peak <= device_gb * GB else "does NOT fit"
    print(f"peak per device {peak / GB:.2f} GB: {verdict} in {device_gb:g} GB ({r['device_kind']} compile)")
    if FLAGS.json:
        record = {**r, "device_gb": device_gb, "fits": peak <= device_gb * GB, "target": FLAGS.target}
        paths.write_atomic(FLAGS.json, lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str)))
    print(f"peak_bytes_per_device={peak}")
    return 0


def run() -> None:
    """The ``sfv-memory`` console script."""
    console.run_absl(main)


if __name__ == "__main__":
    run()
