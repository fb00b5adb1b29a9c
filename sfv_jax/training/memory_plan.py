"""The memory planner's figures: a training config's per-device memory on a mesh, from the compiled
steps' memory analysis (no weights; ``sfv-memory`` is the command, ``sfv-bench train`` puts the figure
for the device it runs on beside the measured peak).

It builds the run's layout (modules, shardings) from the config with ``jax.eval_shape`` only, compiles
the jitted train steps (generator gradients / update and, for SF-V, discriminator gradients / update)
ahead of time on abstract inputs that carry their shardings, and reads each executable's memory
analysis: outputs, donated (aliased) buffers and XLA's temporaries, per device. Everything the trainer
keeps between steps (trained and frozen parameters, EMA, optimizer states, frozen backbone, the batch)
is *resident*; a step's peak is resident + the gradients it receives (update steps) + outputs - aliased
+ temporaries; the run's peak is the largest.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.diffusion.pipeline import sampling_program
from sfv_jax.models.build import abstract_params
from sfv_jax.parallel import sharding, targets
from sfv_jax.training import heldout, objectives
from sfv_jax.training.discriminator import backbone_subset
from sfv_jax.training.layout import build_modules, make_layout, whole_teacher

GB = 1e9


def shard_bytes(abstract) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(abstract):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def plan_devices(config, target: str | None = None) -> list:
    """The devices a plan of ``config``'s mesh compiles for: ``target``'s (abstract, any count; see
    :mod:`sfv_jax.parallel.targets`), else the accelerators present if there are enough, else as many CPU
    devices (``--xla_force_host_platform_device_count`` set before JAX starts)."""
    sizes = config.mesh.to_dict()
    if any(s == -1 for s in sizes.values()) and target is None:
        return jax.devices()
    n = math.prod(s for s in sizes.values() if s > 0)
    if target is not None:
        if any(s == -1 for s in sizes.values()):  # the -1 axis spans one host of the target
            n = math.lcm(n, targets.get(target).per_host)
        return targets.topology(target, n)
    devices = jax.devices()
    if len(devices) < n:
        devices = jax.devices("cpu")
    if len(devices) < n:
        raise sharding.ShardingError(
            f"--mesh needs {n} devices; {len(devices)} present (set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n} before JAX starts)"
        )
    return devices[:n]


PROGRAMS = ("g_grads", "g_update", "d_grads", "d_update", "heldout")  # heldout: the grip (SF-V, when on)


def step_figures(compiled, resident: int, gradients_in: int, compile_s: float) -> dict:
    """One compiled program's per-device figures: its memory analysis (outputs, donated buffers,
    temporaries, code), FLOPs where the compiler reports them, and the peak = ``resident`` +
    ``gradients_in`` + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    fig = {
        "resident": resident,
        "gradients_in": gradients_in,
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
        "compile_s": compile_s,
        "flops": targets.flops(compiled),
    }
    fig["peak"] = resident + gradients_in + fig["outputs"] - fig["aliased"] + fig["temporaries"]
    return fig


def plan_memory(config, mesh_spec: str | None = None, log=print, target: str | None = None, programs=None) -> dict:
    """Compile the train steps for ``config`` on the mesh (for ``target``'s devices, or the local / CPU
    ones) and return the per-device memory figures; ``programs``: a subset of :data:`PROGRAMS` (default
    all that the run executes: the objective's steps, and SF-V's held-out grip when ``heldout_every_steps``
    is on; the peak is then over those)."""
    unknown = set(programs or ()) - set(PROGRAMS)
    if unknown:
        raise sharding.ShardingError(f"--steps {','.join(sorted(unknown))}: not among {', '.join(PROGRAMS)}")
    if mesh_spec:
        config.mesh.update(sharding.parse_mesh(mesh_spec))
    devices = plan_devices(config, target)
    notes = []
    if devices[0].platform == "cpu":
        notes.append("XLA:CPU compile with its memory-minimising scheduler (estimates of a GPU compile)")
    plan = sharding.Plan.from_config(config, devices)
    unet, vae, clip = build_modules(config, svd_defaults=True)
    lay = make_layout(config, plan, unet, vae, clip)
    steps = lay.steps(config)
    state, batch = lay.abstract_state, lay.abstract_batch(config)
    backbone = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        backbone_subset(state.unet_params(), whole_teacher(config)) if lay.backbone_shardings else {},
        lay.backbone_shardings,
    )
    log(
        f"mesh {plan.describe()} on {devices[0].platform}; {lay.global_micro} samples per accumulation step x "
        f"{config.data.accum_steps}; {config.data.num_frames} x {config.data.height} x {config.data.width}; "
        f"compute {config.model.dtype}, remat {config.model.remat_policy}; objective {config.objective}, "
        f"trainable {config.trainable}"
    )
    resident = {
        "generator": shard_bytes(state.generator),
        "frozen": shard_bytes(state.frozen),
        "ema": shard_bytes(state.ema),
        "generator_opt": shard_bytes(state.gen_opt),
        "heads": shard_bytes(state.heads),
        "heads_opt": shard_bytes(state.disc_opt),
        "backbone": shard_bytes(backbone),
        "batch": shard_bytes(batch),
    }
    out = {
        "mesh": plan.shape,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "resident": resident,
        "steps": {},
        "notes": notes,
    }
    for note in notes:
        log(f"note: {note}")
    calls = steps.abstract_calls(state, batch, backbone)
    if steps.d_grads is not None and (config.heldout_every_steps or "heldout" in (programs or ())):
        calls["heldout"] = heldout.abstract_call(steps, plan, state, batch, backbone, config.heldout_steps)
    if "heldout" in calls:  # the grip's fixed clips stay on the devices for the whole run
        resident["heldout_clips"] = shard_bytes(calls["heldout"][1][1])
    if programs:
        calls = {name: call for name, call in calls.items() if name in programs}
    resident_total = sum(resident.values())
    carried = {name: shard_bytes(args[1]) if name.endswith("update") else 0 for name, (_, args) in calls.items()}
    for name, (fn, args) in calls.items():
        t0 = time.time()
        log(f"compiling {name} ...")
        with plan.context():
            compiled = fn.lower(*args).compile()
        fig = step_figures(compiled, resident_total, carried[name], time.time() - t0)
        out["steps"][name] = fig
        log(
            f"  {name}: peak {fig['peak'] / GB:.3f} GB (temporaries {fig['temporaries'] / GB:.3f}) "
            f"compiled in {time.time() - t0:.0f} s"
        )
    frozen = abstract_params(vae), abstract_params(clip)
    out["frozen_encoders_first_device"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
    out["peak_bytes_per_device"] = max(f["peak"] for f in out["steps"].values())
    return out


def plan_sampler(config, target: str | None = None, log=print) -> dict:
    """Compile the pipeline's UNet stage for one device and return its memory figures: the SF-V sampler
    (``objective="sfv"``: ``config.sample.steps`` single-forward steps, no guidance; with
    ``sample.sfv_guidance`` the teacher's guidance, the batch doubled) or the teacher
    (``"diffusion"``: ``sample.steps`` Euler steps with per-frame guidance, the batch doubled), one video of
    ``data.num_frames`` at ``sample.height`` x ``sample.width``, parameters stored in ``model.dtype``."""
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    if target:  # one device (of a TPU slice's smallest topology)
        device = targets.topology(target, 4 if targets.get(target).platform == "tpu" else 1)[0]
    else:
        device = jax.devices()[0]
    unet = build_modules(config, svd_defaults=True)[0].clone(remat_policy="none")
    dtype = unet.dtype
    sampler = objectives.SAMPLER[config.objective]
    steps = int(config.sample.steps)
    f, (h, w) = config.data.num_frames, (s // 8 for s in (config.sample.height, config.sample.width))
    one = jax.sharding.SingleDeviceSharding(device)
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one)
    params = jax.tree.map(lambda a: sds(a.shape, dtype), abstract_params(unet))
    latent = (1, f, h, w, 4)
    noise = sds((steps, *latent) if sampler == "sfv" else latent, jnp.float32)
    n_sigmas = steps if sampler == "sfv" else steps + 1
    guided = GenerationSettings.from_mapping(config.sample, sampler=sampler).guided  # the pipeline's own rule
    scales = sds((f,), jnp.float32) if guided else None
    args = (params, noise, sds(latent, jnp.float32), sds((1, 1, unet.config.cross_attention_dim[0]), jnp.float32))
    args += (sds((1, 3), jnp.float32), sds((n_sigmas,), jnp.float32), scales)
    name = f"sample_{sampler}{steps}" + ("_guided" if guided and sampler == "sfv" else "")
    size = f"{f} x {config.sample.height} x {config.sample.width}"
    log(f"compiling {name}: {size}, {jnp.dtype(dtype).name} on {device.device_kind}")
    t0 = time.time()
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
        compiled = jax.jit(sampling_program(unet, sampler)).lower(*args).compile()
    # nothing is kept between calls but what the program reads: its arguments are what the device holds
    fig = step_figures(compiled, shard_bytes(params), 0, time.time() - t0)
    fig["peak"] += int(compiled.memory_analysis().argument_size_in_bytes) - fig["resident"]
    log(f"  {name}: peak {fig['peak'] / GB:.3f} GB compiled in {fig['compile_s']:.0f} s")
    return {
        "mesh": {"data": 1},
        "platform": device.platform,
        "device_kind": device.device_kind,
        "resident": {"unet": fig["resident"]},
        "steps": {name: fig},
        "notes": [],
        "frozen_encoders_first_device": 0,
        "peak_bytes_per_device": fig["peak"],
    }
