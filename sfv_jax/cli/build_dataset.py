"""Build a training dataset from a folder of videos (see :mod:`sfv_jax.data.folder`).

    python -m sfv_jax.cli.build_dataset --videos DIR --out DIR --fps 7 --height 448 --width 768 [--workers 8]

Prints progress, one line per skipped video, and as its last line ``examples=<n> skipped=<m>``. Train on
it with ``--config.data.kind=folder --config.data.path=DIR``. Exit status 2 for bad flags or a folder
with no usable video (nothing is written then).
"""

from __future__ import annotations

import argparse
import logging
import os

from sfv_jax import console
from sfv_jax.data.folder import DatasetError, build_folder_dataset
from sfv_jax.paths import OutputError, OutputLock, output_overlaps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfv-build-dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    p.add_argument("--out", required=True, help="output dataset folder (created; must not exist or be empty)")
    p.add_argument("--fps", type=float, default=7.0, help="target frame rate (default 7, the paper's)")
    p.add_argument("--height", type=int, required=True, help="frame height after resize + centre crop")
    p.add_argument("--width", type=int, required=True, help="frame width after resize + centre crop")
    p.add_argument(
        "--min-frames", type=int, default=14, help="skip videos with fewer frames at --fps (default 14: one SVD clip)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="keep only the first seconds of longer videos (default 60; 0 keeps everything)",
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    if problem := output_overlaps("--out", args.out, {"--videos": args.videos}):  # before the lock file beside it
        return console.fail(problem)
    try:
        with OutputLock(args.out, "--out", command="sfv-build-dataset"):
            info = build_folder_dataset(
                args.videos,
                args.out,
                fps=args.fps,
                height=args.height,
                width=args.width,
                min_frames=args.min_frames,
                max_seconds=args.max_seconds or None,
                workers=args.workers,
                overwrite=args.overwrite,
            )
    except (DatasetError, OutputError) as e:
        return console.fail(e)
    for path, reason in info["skipped_videos"]:
        print(f"skipped {path}: {reason}")
    print(f"dataset written to {os.path.abspath(args.out)} ({info['videos']} videos found)")
    print(f"examples={info['examples']} skipped={info['skipped']}")
    return 0


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
