"""Benchmarks (never timed tests), each against the PyTorch reference in the same run:

  python -m sfv_jax.bench unet [--config small|svd|tiny_a|tiny_b] ...      one UNet forward
  python -m sfv_jax.bench pipeline [--config small|svd|tiny] [--steps N]   image -> video, per stage

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
    args = parser.parse_args(argv)
    {"unet": bench_unet, "pipeline": bench_pipeline}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
