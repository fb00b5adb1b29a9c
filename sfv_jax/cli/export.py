"""A training run -> a pipeline folder: ``sfv-export --workdir RUN --out DIR`` (``python -m sfv_jax.cli.export``).

  sfv-export --workdir runs/sfv_svd --out checkpoints/sfv                          # EMA, latest step
  sfv-export --workdir runs/sfv_svd --out checkpoints/sfv_5k --step 5000 --weights generator
  sfv-export --workdir runs/toy_teacher --out toy_teacher --dtype bfloat16        # half the bytes
  sfv-sample --model checkpoints/sfv --image cat.png --out cat.mp4                 # one step

What is written: :mod:`sfv_jax.training.export`.
"""

from __future__ import annotations

import argparse

from sfv_jax import console
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.models.build import DTYPES
from sfv_jax.paths import OutputError, OutputLock, folder_problem, output_overlaps
from sfv_jax.training.export import WEIGHTS, export_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfv-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training workdir (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw generator weights")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="store every component's weights in this dtype"
    )
    args = p.parse_args(argv)
    # before the lock (its file sits beside --out): an --out inside --workdir, a file, a symlink, a read-only place
    if problem := output_overlaps("--out", args.out, {"--workdir": args.workdir}) or folder_problem(
        "--out", args.out, replaced=True
    ):
        return console.fail(problem)
    try:
        with OutputLock(args.out, "--out", command="sfv-export"):
            out = export_run(
                args.workdir, args.out, weights=args.weights, step=args.step, overwrite=args.overwrite, dtype=args.dtype
            )
    except (CheckpointError, FileNotFoundError, OutputError) as e:
        return console.fail(e)
    print(f"exported {args.weights} weights of {args.workdir} to {out}")
    return 0


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
