"""``sfv-bench data``: the data pipeline's throughput on this machine, each figure next to
its reference measured in the same run.

1. build: a folder of generated source videos (``--videos`` of ``--seconds`` s at ``--src-fps``,
   ``--src-height x --src-width``, H.264) -> the folder dataset at ``--fps``, ``--height x --width``
   (videos/s with ``--workers`` processes);
2. read: training clips (``--frames`` frames, random windows) from the built dataset through grain with
   ``--workers`` threads, in decoded clips/s; reference: decoding each clip straight from its mp4 with
   PyAV (what a loader without a built dataset does), same clips count, same threads;
3. encode: clips/s (= latent clips/s) of the JAX :class:`ClipEncoder` (VAE posterior of every frame +
   the noised conditioning frame + CLIP embedding) against diffusers / transformers in PyTorch on the same
   random weights and clips (``--vae tiny|small|svd``: :mod:`sfv_jax.models.presets`).
"""

from __future__ import annotations

import concurrent.futures
import tempfile
import time
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image

from sfv_jax.checkpoint import convert
from sfv_jax.configs import tiny
from sfv_jax.data import clips, video_io
from sfv_jax.data.folder import build_folder_dataset
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.sources import ClipSource
from sfv_jax.diffusion import conditioning
from sfv_jax.models import presets
from sfv_jax.models.build import abstract_params, image_encoder_from_config, vae_from_config
from sfv_jax.testing import missing_dev_extras
from sfv_jax.testing import torch_reference as ref


def _source_video(i: int, n: int, h: int, w: int) -> np.ndarray:
    """A smooth moving texture (cheap to make; realistic for the codec, unlike noise)."""
    rng = np.random.default_rng(i)
    yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32), np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
    base = np.stack([np.sin((a * xx + b * yy) * 6.28 * f + p) for a, b, f, p in rng.uniform(0.2, 3, (3, 4))], -1)
    base = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
    vx, vy = rng.integers(1, 6, 2)
    return np.stack([np.roll(base, (t * vy, t * vx), axis=(0, 1)) for t in range(n)])


def bench_data(args) -> dict:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_src = int(round(args.seconds * args.src_fps))
        t0 = time.perf_counter()
        for i in range(args.videos):
            video_io.write_video(
                tmp / "videos" / f"v{i:04d}.mp4",
                _source_video(i, n_src, args.src_height, args.src_width),
                fps=args.src_fps,
            )
        print(
            f"[bench] made {args.videos} source videos ({n_src} frames {args.src_height}x{args.src_width} at "
            f"{args.src_fps:g} fps) in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

        t0 = time.perf_counter()
        info = build_folder_dataset(
            tmp / "videos",
            tmp / "built",
            fps=args.fps,
            height=args.height,
            width=args.width,
            min_frames=args.frames,
            workers=args.workers,
        )
        dt = time.perf_counter() - t0
        out["build_videos_per_s"] = info["examples"] / dt
        print(
            f"[bench] build: {info['examples']} videos in {dt:.2f}s = {out['build_videos_per_s']:.2f} videos/s "
            f"({args.workers} processes)",
            flush=True,
        )

        config = tiny.get_config()
        config.data = ml_collections.ConfigDict(
            {
                **config.data.to_dict(),
                "kind": "folder",
                "path": str(tmp / "built"),
                "height": args.height,
                "width": args.width,
                "fps": args.fps,
                "num_frames": args.frames,
            }
        )
        source = ClipSource(config)
        ds = source.dataset()
        opts = grain.ReadOptions(num_threads=args.workers, prefetch_buffer_size=2 * args.workers)

        def read(count: int) -> float:
            it = iter(ds[:count].to_iter_dataset(opts))
            t0 = time.perf_counter()
            for _ in range(count):
                next(it)
            return count / (time.perf_counter() - t0)

        read(args.workers)  # warm up
        out["read_clips_per_s"] = read(args.clips)
        paths = sorted((tmp / "videos").glob("*.mp4"))

        def naive(p: int) -> np.ndarray:  # decode the video, resample, crop, take the same-length window
            frames, _ = clips.decode_video(paths[p % len(paths)], fps=args.fps, height=args.height, width=args.width)
            s = clips.window_start(len(frames), args.frames, np.random.default_rng(p))
            return frames[s : s + args.frames]

        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            t0 = time.perf_counter()
            list(pool.map(naive, range(args.clips)))
            out["naive_clips_per_s"] = args.clips / (time.perf_counter() - t0)
        print(
            f"[bench] read: {out['read_clips_per_s']:.1f} clips/s of {args.frames}x{args.height}x{args.width} "
            f"(folder dataset, {args.workers} threads); decoding the mp4s directly: "
            f"{out['naive_clips_per_s']:.1f} clips/s; ratio {out['read_clips_per_s'] / out['naive_clips_per_s']:.1f}x",
            flush=True,
        )
        batch = np.stack([ds[p]["frames"] for p in range(args.batch)])
    if missing_dev_extras():
        print(f"[bench] encode: skipped ({', '.join(missing_dev_extras())} not installed: pip install -e '.[dev]')")
    else:
        out.update(_bench_encode(args, batch))
    print("data_" + " data_".join(f"{k}={v:.3f}" for k, v in out.items()))
    return out


def _bench_encode(args, frames: np.ndarray) -> dict:
    """ClipEncoder (JAX) vs the same encoding in PyTorch: clips/s."""
    import torch

    _, vae_cfg, clip_cfg = presets.PIPELINES[args.vae]
    tvae, tclip = ref.build_vae(vae_cfg), ref.build_image_encoder(clip_cfg)
    vae = vae_from_config(vae_cfg)
    clip = image_encoder_from_config(clip_cfg)

    def params(tm, model):
        state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        return jax.tree.map(jax.numpy.asarray, convert.torch_to_flax(state, abstract_params(model), progress=False))

    enc = ClipEncoder(vae, params(tvae, vae), clip, params(tclip, clip), devices=jax.local_devices())
    b = len(frames)
    index = np.arange(b)
    run = lambda: enc(frames, index, fps=7, motion_bucket_ids=[127.0] * b, noise_aug_strength=0.02)  # noqa: E731
    run()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        run()
    jax_cps = b * args.repeats / (time.perf_counter() - t0)

    size = clip_cfg["image_size"]
    px = torch.from_numpy(
        np.stack(
            [
                conditioning.clip_pixels(PIL.Image.fromarray(f[0]), size, conditioning.CLIP_MEAN, conditioning.CLIP_STD)
                for f in frames
            ]
        )
        .transpose(0, 3, 1, 2)
        .copy()
    )

    @torch.no_grad()
    def trun():
        x = torch.from_numpy(frames.reshape(-1, *frames.shape[2:]).transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1
        tvae.encode(x).latent_dist.mode()
        cond = x.view(b, -1, *x.shape[1:])[:, 0]
        tvae.encode(cond + 0.02 * torch.randn_like(cond)).latent_dist.mode()
        _ = tclip(pixel_values=px).image_embeds

    trun()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        trun()
    torch_cps = b * args.repeats / (time.perf_counter() - t0)
    print(
        f"[bench] encode ({args.vae} VAE + CLIP, batch {b}): jax {jax_cps:.2f} clips/s, pytorch {torch_cps:.2f} "
        f"clips/s (threads {torch.get_num_threads()}); ratio jax/torch {jax_cps / torch_cps:.2f}",
        flush=True,
    )
    return {"encode_clips_per_s": jax_cps, "encode_torch_clips_per_s": torch_cps}


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="folder build, clip reading and latent encoding throughput")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--src-fps", type=float, default=30.0)
    p.add_argument("--src-height", type=int, default=360)
    p.add_argument("--src-width", type=int, default=640)
    p.add_argument("--fps", type=float, default=7.0)
    p.add_argument("--height", type=int, default=448)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clips", type=int, default=32, help="clips timed in the read stage")
    p.add_argument("--vae", choices=["tiny", "small", "svd"], default="small", help="encoder sizes (presets)")
    p.set_defaults(run=bench_data)
    p.add_argument("--batch", type=int, default=2, help="clips per encoder call")
    p.add_argument("--repeats", type=int, default=2)
