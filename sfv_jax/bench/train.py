"""``sfv-bench train``: one training iteration (SF-V: generator step + discriminator step; ``--objective
diffusion``: one denoising step; random weights and latents): seconds, model FLOP utilisation (XLA's FLOP
count of the steps without remat, per second, over the device's peak bf16 FLOP/s; ``--peak-tflops`` for
devices not in the table), hardware FLOP utilisation, the measured peak device memory (where the device
reports it) beside the memory planner's figure for the same config compiled for this device; its PyTorch
reference is a diffusers UNet forward + backward against the Flax one."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sfv_jax.bench import common
from sfv_jax.checkpoint import convert
from sfv_jax.configs import sfv_svd, tiny
from sfv_jax.models import presets
from sfv_jax.models.build import COMPUTE_DTYPES, abstract_params
from sfv_jax.parallel import sharding
from sfv_jax.testing import missing_dev_extras
from sfv_jax.testing import torch_reference as ref
from sfv_jax.timing import median_time
from sfv_jax.training import memory_plan, objectives, param_groups
from sfv_jax.training.layout import build_modules, init_params, init_train_state, make_layout


def bench_train(args) -> dict:
    gpu = jax.default_backend() != "cpu"
    name = args.config or ("svd" if gpu else "tiny")
    config = tiny.get_config() if name == "tiny" else sfv_svd.get_config()
    if name != "tiny":
        unet_cfg, vae_cfg, clip_cfg = presets.PIPELINES[name]
        config.model.unet, config.model.vae, config.model.image_encoder = unet_cfg, vae_cfg, clip_cfg
    config.model.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    config.model.remat_policy = args.remat or config.model.remat_policy
    if name != "tiny":  # tiny keeps its 16x16x4; small: 128x128 on a CPU; svd or any GPU: the paper's 768x448
        config.data.height, config.data.width = (448, 768) if gpu or name == "svd" else (128, 128)
        config.data.num_frames = 14
    config.data.height, config.data.width = args.height or config.data.height, args.width or config.data.width
    config.data.num_frames = args.frames or config.data.num_frames
    config.data.micro_batch, config.data.accum_steps = args.batch, getattr(args, "accum", 1)
    config.objective, config.trainable = args.objective, args.trainable
    config.mesh.update(sharding.parse_mesh(args.mesh) if args.mesh else {"data": 1, "fsdp": -1, "tensor": 1})
    plan = sharding.Plan.from_config(config)
    d = config.data
    print(
        f"[bench] train config={name} mesh {plan.describe()} {d.micro_batch} per device x {d.num_frames}x{d.height}x"
        f"{d.width} {config.model.dtype} remat={config.model.remat_policy} objective={config.objective} "
        f"trainable={config.trainable} jax={jax.__version__} "
        f"device={jax.devices()[0].device_kind}",
        flush=True,
    )

    t0 = time.perf_counter()
    lay = make_layout(config, plan, *build_modules(config))
    unet_params, _, _, head_params, backbone = init_params(config, lay, jax.random.PRNGKey(0))
    state = init_train_state(lay, unet_params, head_params, jax.random.PRNGKey(1))
    del unet_params, head_params
    abstract = lay.abstract_batch(config)
    rng = np.random.default_rng(0)
    host = {
        k: (
            np.arange(a.size, dtype=np.int32).reshape(a.shape)
            if k == "index"
            else rng.standard_normal(a.shape).astype(np.float32)
        )
        for k, a in abstract.items()
    }
    host["added_time_ids"][:] = [6.0, 127.0, 0.02]
    batch = {k: jax.device_put(v, abstract[k].sharding) for k, v in host.items()}
    steps = lay.steps(config)
    print(f"[bench] random init in {time.perf_counter() - t0:.1f}s", flush=True)

    holder = {"state": state}

    def iteration():
        holder["state"], m = steps.step(holder["state"], batch, backbone)
        return m

    t0 = time.perf_counter()
    jax.block_until_ready(iteration())
    compile_s = time.perf_counter() - t0
    step_s = median_time(iteration, args.repeats, warmup=0).median_s
    state = holder["state"]
    stats = jax.devices()[0].memory_stats() or {}
    measured_peak = stats.get("peak_bytes_in_use")

    # FLOPs: the steps as compiled (hardware: with recomputation) and without remat (model FLOPs)
    if config.model.remat_policy == "none":  # the steps as they are (tracing them again costs seconds)
        plain = steps
    else:
        model_cfg = config.copy_and_resolve_references()
        model_cfg.model.remat_policy = "none"
        plain = make_layout(model_cfg, plan, *build_modules(model_cfg)).steps(model_cfg)
    call_args = {"g": (state, batch, backbone), "d": (state, batch, backbone, *steps.substep_args())}
    grads = [(f, call_args[k]) for k, f in (("g", steps.g_grads), ("d", steps.d_grads)) if f is not None]
    plain_grads = [(f, call_args[k]) for k, f in (("g", plain.g_grads), ("d", plain.d_grads)) if f is not None]
    with plan.context():
        hw = sum(common.flops(f.lower(*a).compile()) for f, a in grads)
        model_flops = sum(common.flops(f.lower(*a)) for f, a in plain_grads)
    kind = jax.devices()[0].device_kind
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in common.PEAK_BF16.items() if kind.startswith(k)), None)
    )
    n = plan.mesh.devices.size
    achieved = model_flops / step_s / n
    print(
        f"[bench] iteration ({'G step + D step' if steps.d_grads else 'one step'}): {step_s:.4f} s median of "
        f"{args.repeats} (first, with compilation, {compile_s:.1f} s); {d.micro_batch * plan.batch_shards} samples"
    )
    print(
        f"[bench] model FLOPs {model_flops:.3e} / iteration (hardware {hw:.3e}); {achieved / 1e12:.2f} TFLOP/s "
        f"per device" + (f" of {peak / 1e12:.0f} peak" if peak else " (peak unknown for this device: --peak-tflops)")
    )
    planned = memory_plan.plan_memory(config.copy_and_resolve_references(), log=lambda _: None)
    print(
        f"[bench] peak device memory: measured {measured_peak / 1e9:.2f} GB"
        if measured_peak
        else "[bench] peak device memory: not reported by this device",
        f"; planner (this config compiled for {planned['platform']}) {planned['peak_bytes_per_device'] / 1e9:.2f} GB",
    )
    out = {
        "objective": config.objective,
        "trainable": config.trainable,
        "compile_s": compile_s,
        "measured_peak_bytes": measured_peak,
        "planned_peak_bytes": planned["peak_bytes_per_device"],
        "iteration_s": step_s,
        "model_flops": model_flops,
        "hardware_flops": hw,
        "tflops_per_device": achieved / 1e12,
    }
    if peak:
        out["mfu"], out["hfu"] = achieved / peak, hw / step_s / n / peak
        print(f"train_iteration_s={step_s:.4f} mfu={out['mfu']:.3f} hfu={out['hfu']:.3f}")
    else:
        print(f"train_iteration_s={step_s:.4f} tflops_per_device={achieved / 1e12:.3f}")
    if not args.no_torch:
        out.update(_unet_fwd_bwd(config, lay, args))
    return out


def _unet_fwd_bwd(config, lay, args) -> dict:
    """One UNet forward + backward (gradient of the output's mean w.r.t. the parameters), Flax vs diffusers,
    same config, weights, inputs and dtype, on one device."""
    if missing_dev_extras():
        print(
            f"[bench] {', '.join(missing_dev_extras())} not installed: no PyTorch reference (pip install -e '.[dev]')"
        )
        return {}
    import torch

    d, f = config.data, lay.vae.config.downsample_factor
    cfg = config.model.unet.to_dict() if config.model.unet is not None else dict(presets.UNETS["svd"])
    tmodel = ref.build_unet(cfg)
    model = lay.unet
    params = jax.tree.map(
        jnp.asarray,
        convert.torch_to_flax(
            {k: v.numpy() for k, v in tmodel.state_dict().items()}, abstract_params(model), progress=False
        ),
    )
    inputs = ref.unet_inputs(cfg, d.micro_batch, d.num_frames, d.height // f, d.width // f)
    jin = [jnp.asarray(x) for x in inputs]
    grad = jax.jit(jax.grad(lambda p, *a: jnp.mean(model.apply({"params": p}, *a).astype(jnp.float32))))
    flax_s = median_time(lambda: grad(params, *jin), args.repeats, warmup=1).median_s
    device, sync = common.torch_device()
    tdtype = common.torch_dtype(config.model.dtype)
    tmodel = tmodel.to(device, tdtype).train()
    t_in = [
        torch.from_numpy(np.ascontiguousarray(inputs[0].transpose(0, 1, 4, 2, 3))).to(device, tdtype),
        torch.from_numpy(inputs[1]).to(device),
        torch.from_numpy(inputs[2]).to(device, tdtype),
        torch.from_numpy(inputs[3]).to(device, tdtype),
    ]

    def torch_step():
        tmodel.zero_grad(set_to_none=True)
        tmodel(*t_in, return_dict=False)[0].float().mean().backward()
        sync()

    torch_s = median_time(torch_step, args.repeats, warmup=1).median_s
    print(f"[bench] unet forward+backward: flax {flax_s:.4f} s, pytorch {torch_s:.4f} s on {device}")
    print(
        f"unet_fwd_bwd_flax_s={flax_s:.4f} unet_fwd_bwd_torch_s={torch_s:.4f} "
        f"ratio_flax_over_torch={flax_s / torch_s:.3f}"
    )
    return {"unet_fwd_bwd_flax_s": flax_s, "unet_fwd_bwd_torch_s": torch_s, "ratio": flax_s / torch_s}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="one training iteration: time, MFU, memory; UNet fwd+bwd vs diffusers")
    p.add_argument("--objective", choices=objectives.OBJECTIVES, default="sfv")
    p.add_argument("--trainable", choices=param_groups.TRAINABLE, default="all")
    p.add_argument("--config", choices=["tiny", "small", "svd"], default=None, help="default: svd on GPU, tiny on CPU")
    p.add_argument("--mesh", default=None, help="AXIS=SIZE[,...] over data, fsdp, tensor (default: all devices fsdp)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--remat",
        choices=["none", "full", "dots", "dots_no_batch"],
        default=None,
        help="default: the config's (full; none for tiny)",
    )
    p.add_argument("--height", type=int, default=None, help="default 448 (GPU or svd)")
    p.add_argument("--width", type=int, default=None, help="default 768 (GPU or svd)")
    p.add_argument("--frames", type=int, default=None, help="default 14 (tiny: 4)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per device")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps per iteration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s when not in the table")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch UNet forward+backward reference")
    p.set_defaults(run=bench_train)
