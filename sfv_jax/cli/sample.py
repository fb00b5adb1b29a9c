"""Image -> video from the command line: ``sfv-sample --model PATH --image IMG --out out.mp4``
(``python -m sfv_jax.cli.sample``).

``--model`` is an SVD folder in diffusers format (``model_index.json``, ``unet/``, ``vae/``,
``image_encoder/``, ``feature_extractor/``) or its converted copy (``sfv-convert``);
converting once makes every later start faster. ``--sampler sfv`` runs the SF-V generator (one step by
default; ``--num-inference-steps`` 2-4 on its 4-point grid); ``--sampler svd`` the SVD teacher (25 Euler steps with
per-frame guidance by default). The output format follows the extension of ``--out`` (.mp4, .gif,
.png frame strip); ``--gif`` / ``--strip`` write those as well. Per-stage timings are printed at the end.

Examples:
  sfv-sample --model checkpoints/svd --image cat.png --out cat.mp4 --sampler svd --num-inference-steps 25
  sfv-sample --model runs/sfv/export --image cat.png --out cat.mp4 --sampler sfv --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from sfv_jax import console
from sfv_jax.checkpoint import pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.data import video_io
from sfv_jax.diffusion import conditioning
from sfv_jax.diffusion.conditioning import ImageError
from sfv_jax.diffusion.generation import SAMPLERS, GenerationSettings
from sfv_jax.diffusion.pipeline import STAGES
from sfv_jax.models.build import COMPUTE_DTYPES, DTYPES
from sfv_jax.paths import OutputError, OutputLock

CLI_DEFAULTS = {"sampler": "sfv"}  # the command runs the SF-V generator unless told otherwise
_TYPES = {"int": int, "int | None": int, "float": float, "str": str}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sfv-sample", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="SVD / SF-V folder (diffusers format or converted)")
    p.add_argument("--image", required=True, help="conditioning image (any size; resized as diffusers does)")
    p.add_argument("--out", required=True, help="output video: .mp4, .gif or .png (frame strip)")
    p.add_argument("--seed", type=int, default=0, help="drives every random draw")
    for f in dataclasses.fields(GenerationSettings):  # one flag per generation setting, named for it
        if str(f.type) == "bool":  # --sfv-guidance / --no-sfv-guidance
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": _TYPES[str(f.type)], "choices": SAMPLERS if f.name == "sampler" else None}
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=CLI_DEFAULTS.get(f.name, f.default),
            help=GenerationSettings.HELP[f.name],
            **kind,
        )
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help="compute dtype of UNet / CLIP / decoder")
    p.add_argument("--gif", action="store_true", help="also write a .gif next to --out")
    p.add_argument("--strip", action="store_true", help="also write a .png frame strip next to --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    extra = [out.with_suffix(sfx) for flag, sfx in ((args.gif, ".gif"), (args.strip, ".png")) if flag]
    try:  # every output checked before the video is generated
        for path in (out, *extra):
            video_io.check_output(path, args.fps)
    except video_io.VideoError as e:
        return console.fail(f"--out / --fps: {e}")
    try:
        with OutputLock(args.out, "--out", command="sfv-sample"):
            return _sample(args, out, extra)
    except OutputError as e:
        return console.fail(e)


def _sample(args: argparse.Namespace, out: Path, extra: list[Path]) -> int:
    fields = [f.name for f in dataclasses.fields(GenerationSettings)]
    try:  # the settings and the image before the model: a mistake costs no model load
        settings = GenerationSettings(**{name: getattr(args, name) for name in fields})
    except ValueError as e:
        name = str(e).split()[0]
        return console.fail(f"--{name.replace('_', '-')}: {e}" if name in fields else e)
    try:
        image = conditioning.load_image(args.image)
    except ImageError as e:
        return console.fail(f"--image: {e}")
    t0 = time.perf_counter()
    try:
        pipe = pretrained.load_pipeline(args.model, DTYPES[args.dtype])
        load_s = time.perf_counter() - t0
        print(f"[sample] loaded {args.model} in {load_s:.1f}s; sampling with {args.sampler}...", flush=True)
        frames = pipe.generate([image], [args.seed], settings)[0]
    except (CheckpointError, ImageError, ValueError) as e:
        return console.fail(e)
    written = []
    try:
        for path in dict.fromkeys((out, *extra)):  # (--gif with a .gif --out: once)
            written.append(video_io.write_video(path, frames, fps=args.fps))
    except (video_io.VideoError, OSError) as e:  # the frames are kept: a fallback file beside the output
        fallback = _save_fallback(out, frames)
        return console.fail(f"writing {path} failed ({e}); the generated frames are saved in {fallback}")
    t = pipe.last_timings
    steps = int(t.get("unet_steps", 0))
    print(
        f"[sample] wrote {', '.join(map(str, written))}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}"
    )
    print(
        "[sample] stage timings (s): "
        + "  ".join(f"{s}={t.get(s, 0.0):.3f}" for s in STAGES)
        + f"  (unet: {steps} step(s)); compile={t.get('compile', 0.0):.1f}; load={load_s:.1f}"
    )
    return 0


def _save_fallback(out: Path, frames) -> Path:
    """The frames as ``<out>.unsaved_frames.npy`` (uint8 [F, H, W, 3]), else in the working folder."""
    data = video_io.to_uint8(frames)
    for folder in (out.parent, Path.cwd()):
        path = folder / f"{out.stem}.unsaved_frames.npy"
        try:
            np.save(path, data)
            return path.absolute()
        except OSError:
            continue
    raise OSError("the generated frames could not be saved anywhere")


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
