"""``sfv-bench pipeline``: image -> video, stage by stage (image encoder, VAE encode, UNet sampling loop,
VAE decode), the JAX pipeline against diffusers' ``StableVideoDiffusionPipeline`` on the same random-weight
components, image and latents (teacher sampler, guidance on; ``--steps 1 --max-guidance-scale 1`` is SF-V's single
forward pass: one UNet call, the same in both); prints ``ratio_flax_over_torch``."""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict

import jax
import numpy as np
import PIL.Image

from sfv_jax.bench import common
from sfv_jax.checkpoint import convert, pretrained
from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.diffusion.pipeline import STAGES
from sfv_jax.models import presets
from sfv_jax.models.build import DTYPES
from sfv_jax.testing import require_dev_extras
from sfv_jax.testing import torch_reference as ref
from sfv_jax.timing import median_time


def bench_pipeline(args) -> dict:
    require_dev_extras("sfv-bench pipeline")
    import torch

    name = args.config or common.default_preset()
    dtype_name = common.default_dtype(args.dtype)
    height, width = common.default_size(args.height, args.width)
    unet_cfg, vae_cfg, clip_cfg = presets.PIPELINES[name]
    frames = args.frames or unet_cfg["num_frames"]
    steps = args.steps or (25 if common.on_gpu() else 4)
    print(
        f"[bench] pipeline config={name} {frames}x{height}x{width} teacher {steps} steps (guidance on) {dtype_name} "
        f"jax={jax.__version__} backend={jax.default_backend()} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )

    t0 = time.perf_counter()
    tpipe = ref.build_pipeline(unet_cfg, vae_cfg, clip_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        src = ref.save_pipeline(tpipe, f"{tmp}/diffusers")
        pipe = pretrained.load_pipeline(
            convert.convert_folder(src, f"{tmp}/converted", progress=False), DTYPES[dtype_name], progress=False
        )
    print(f"[bench] built, saved and converted the pipeline in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    factor = pipe.vae_scale_factor
    latents = rng.standard_normal((1, frames, height // factor, width // factor, 4)).astype(np.float32)
    settings = GenerationSettings(
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        min_guidance_scale=args.min_guidance_scale,
        max_guidance_scale=args.max_guidance_scale,
    )
    kw = settings.diffusers_kwargs()

    jax_t = median_time(
        lambda: pipe(image, latents=latents, **kw), args.repeats, args.warmup, stages=lambda: pipe.last_timings
    )

    device, sync = common.torch_device()
    tpipe = tpipe.to(device, common.torch_dtype(dtype_name))
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
    tlatents = torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()).to(device, common.torch_dtype(dtype_name))

    def torch_run():
        torch_timings.clear()
        with torch.no_grad():
            tpipe(image, latents=tlatents, output_type="np", **kw)

    torch_t = median_time(torch_run, args.repeats, args.warmup, stages=lambda: torch_timings)
    ours = {**{s: jax_t.stages_s.get(s, 0.0) for s in STAGES}, "total": jax_t.median_s}
    theirs = {**{s: torch_t.stages_s.get(s, 0.0) for s in STAGES}, "total": torch_t.median_s}
    print(f"[bench] {'stage':<14}{'flax s':>10}{'torch s':>10}{'ratio':>8}   (median of {args.repeats})")
    for stage in (*STAGES, "total"):
        print(
            f"[bench] {stage:<14}{ours[stage]:>10.4f}{theirs[stage]:>10.4f}"
            f"{ours[stage] / max(theirs[stage], 1e-9):>8.3f}"
        )
    ratio = ours["total"] / theirs["total"]
    print(
        f"pipeline_flax_s={ours['total']:.4f} pipeline_torch_s={theirs['total']:.4f} ratio_flax_over_torch={ratio:.3f}"
    )
    return {"flax": ours, "torch": theirs, "ratio": ratio}


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="image -> video per stage: JAX pipeline vs diffusers")
    p.add_argument(
        "--config", choices=sorted(presets.PIPELINES), default=None, help="preset; default: svd on GPU, small on CPU"
    )
    common.add_size_args(p, frames_help="default: the UNet config's num_frames")
    p.add_argument("--steps", type=int, default=None, help="teacher steps (default 25 GPU, 4 CPU)")
    p.add_argument("--min-guidance-scale", type=float, default=1.0, help="teacher guidance, first frame")
    p.add_argument(
        "--max-guidance-scale", type=float, default=3.0, help="last frame; 1 with --steps 1: SF-V's one forward pass"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.set_defaults(run=bench_pipeline)
