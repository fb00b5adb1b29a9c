"""The pipeline against diffusers, end to end: ``python -m sfv_jax.cli.demo [--workdir runs/demo] [--steps 2]``.

1. builds a tiny SVD-shaped StableVideoDiffusionPipeline in PyTorch (diffusers + transformers, random
   weights) and saves it as a diffusers folder, laid out exactly like a published SVD folder;
2. converts the whole folder (UNet, VAE, CLIP image encoder) with :mod:`sfv_jax.checkpoint.convert`;
3. runs the JAX pipeline and diffusers' pipeline on the same image and initial latents (teacher sampler,
   guidance 1 -> 3) and prints their parity (max |jax - torch| of frames in [0, 1]; tolerance 1e-3);
4. samples with the SF-V one-step sampler and writes ``WORKDIR/sfv.mp4``, printing per-stage timings.
Needs the dev extras (torch, diffusers, transformers: ``bash launch/setup.sh --dev``) for the reference side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

from sfv_jax.checkpoint import convert, pretrained
from sfv_jax.data import video_io
from sfv_jax.diffusion.pipeline import STAGES
from sfv_jax.models import presets
from sfv_jax.testing import require_dev_extras
from sfv_jax.testing import torch_reference as ref

TOL = 1e-3
HEIGHT, WIDTH = 48, 40  # the tiny VAE downsamples by 4: latents 12 x 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfv_jax.cli.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where the diffusers / converted folders and mp4 go")
    parser.add_argument("--steps", type=int, default=2, help="teacher (Euler) steps for the parity check")
    args = parser.parse_args(argv)
    require_dev_extras("sfv_jax.cli.demo")
    import torch

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    tpipe = ref.build_pipeline()
    src = ref.save_pipeline(tpipe, work / "diffusers_svd")
    n_params = sum(p.numel() for m in (tpipe.unet, tpipe.vae, tpipe.image_encoder) for p in m.parameters())
    print(
        f"[1/4] tiny diffusers SVD pipeline ({n_params:,} params) saved to {src} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    t0 = time.perf_counter()
    out = convert.convert_folder(src, work / "flax_svd")
    print(f"[2/4] converted to {out} ({time.perf_counter() - t0:.1f}s)", flush=True)

    t0 = time.perf_counter()
    pipe = pretrained.load_pipeline(out)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8))
    frames = presets.UNETS["tiny_b"]["num_frames"]
    latents = rng.standard_normal((1, frames, HEIGHT // 4, WIDTH // 4, 4)).astype(np.float32)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=args.steps, noise_aug_strength=0.0)
    got = pipe(image, latents=latents, **kw)
    want = tpipe(
        image,
        num_frames=frames,
        output_type="np",
        latents=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()),
        **kw,
    ).frames[0]
    err = float(np.abs(got - want).max())
    ok = err <= TOL
    print(
        f"[3/4] JAX vs diffusers pipeline, {args.steps} Euler steps, frames {list(got.shape)} "
        f"({time.perf_counter() - t0:.1f}s): max|jax-torch| = {err:.2e} (tolerance {TOL:g}): "
        f"{'OK' if ok else 'FAILED'}",
        flush=True,
    )

    video = pipe(image, height=HEIGHT, width=WIDTH, sampler="sfv", seed=0)
    path = video_io.write_video(work / "sfv.mp4", video, fps=7)
    t = pipe.last_timings
    print(
        f"[4/4] SF-V one-step sample written to {path}; stage timings (s): "
        + " ".join(f"{s}={t.get(s, 0.0):.3f}" for s in STAGES)
        + f" compile={t.get('compile', 0.0):.1f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
