"""The main job until training lands: ``python -m sfv_jax.demo [--workdir runs/demo] [--config tiny_b]``.

1. builds a small SVD-shaped UNet in PyTorch (diffusers, random weights) and saves it as a diffusers
   folder (config.json + safetensors), exactly as a published SVD ``unet/`` folder looks;
2. converts it with ``sfv_jax.convert`` into a Flax / orbax checkpoint;
3. loads it with ``pretrained.load_unet`` and runs the jitted Flax UNet and the PyTorch UNet on the
   same inputs, and prints their parity (max |jax - torch| / max |torch|; tolerance 1e-4).
Needs the test requirements (torch, diffusers) for the reference side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sfv_jax import convert, pretrained
from sfv_jax import torch_reference as ref
from sfv_jax.bench import CONFIGS

TOL = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfv_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where the diffusers and converted folders go")
    parser.add_argument("--config", default="tiny_b", choices=sorted(c for c in CONFIGS if c != "svd"))
    parser.add_argument("--frames", type=int, default=None, help="default: the config's num_frames")
    parser.add_argument("--latent", type=int, nargs=2, default=(16, 16), metavar=("H", "W"))
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    tmodel = ref.build_unet(config)
    src = ref.save_unet(tmodel, work / "diffusers_unet")
    n_params = sum(p.numel() for p in tmodel.parameters())
    print(f"[1/3] diffusers UNet ({args.config}, {n_params:,} params) saved to {src} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    t0 = time.perf_counter()
    out = convert.convert_folder(src, work / "flax_unet")
    print(f"[2/3] converted to {out} ({time.perf_counter() - t0:.1f}s)", flush=True)

    t0 = time.perf_counter()
    model, params = pretrained.load_unet(out)
    frames = args.frames or config["num_frames"]
    inputs = ref.unet_inputs(config, 1, frames, *args.latent)
    got = np.asarray(jax.jit(model.apply)({"params": params}, *map(jnp.asarray, inputs)))
    want = ref.unet_forward(tmodel, *inputs)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    ok = err <= TOL
    print(f"[3/3] Flax vs PyTorch UNet on sample {list(inputs[0].shape)} -> {list(got.shape)} "
          f"({time.perf_counter() - t0:.1f}s)")
    print(f"parity max|jax-torch|/max|torch| = {err:.3e} (tolerance {TOL:g}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
