"""Checkpoint conversion: ``sfv-convert --src DIR --out DIR`` (``python -m sfv_jax.cli.convert``).

  sfv-convert --src path/to/stable-video-diffusion --out converted/svd     # the whole pipeline
  sfv-convert --src path/to/svd/unet --out converted/unet                  # one component
  sfv-convert --to-diffusers --src converted/svd --out exported/svd        # Flax -> PyTorch formats

The key mapping and the converted format: :mod:`sfv_jax.checkpoint.convert`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sfv_jax import console
from sfv_jax.checkpoint.components import COMPONENTS
from sfv_jax.checkpoint.convert import convert_folder, export_folder
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.models.build import DTYPES
from sfv_jax.paths import OutputError, OutputLock, folder_problem, output_overlaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfv-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="diffusers folder (or, with --to-diffusers, a converted one)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--to-diffusers", action="store_true", help="export a converted checkpoint to diffusers")
    parser.add_argument(
        "--component",
        default=None,
        choices=sorted(COMPONENTS),
        help="default: a whole SVD folder converts every component; a component folder is "
        "recognised from its config.json",
    )
    parser.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16 (default: fp32 if present)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="parameter dtype to store (default: float32; with --to-diffusers: as stored)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    # before the lock (its file sits beside --out): an --out inside --src, a file, a symlink, a read-only place
    if problem := output_overlaps("--out", args.out, {"--src": args.src}) or folder_problem(
        "--out", args.out, replaced=True
    ):
        return console.fail(problem)
    t0 = time.perf_counter()
    try:
        with OutputLock(args.out, "--out", command="sfv-convert"):
            out = _convert(args)
    except (CheckpointError, OutputError) as e:
        return console.fail(e)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _convert(args: argparse.Namespace) -> Path:
    if args.to_diffusers:
        return export_folder(args.src, args.out, dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    return convert_folder(
        args.src,
        args.out,
        component=args.component,
        variant=args.variant,
        dtype=DTYPES[args.dtype or "float32"],
        overwrite=args.overwrite,
    )


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
