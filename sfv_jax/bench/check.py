"""``sfv-bench check``: the prepared device check (``launch/device_check.sh``): one call that measures, on
the device it runs on, each part guarded so that one failure does not lose the others:

  unet_cudnn, unet_xla   one UNet forward, 1024x576x14 bf16, cuDNN and XLA attention, against diffusers
                         (PyTorch SDPA) on the same random weights and inputs: median s, TFLOP/s, ratio
  pipeline_1step         image -> video with one UNet call (image encoder, VAE encode, UNet, VAE
                         decode), per stage, against diffusers' pipeline
  train_sfv              one SF-V iteration (G + D step), 768x448x14 bf16, micro-batch 1, one device:
                         s, MFU, measured peak memory and the planner's figure for this device
  train_diffusion        the same for one diffusion-objective step

It prints one table and writes ``--json``. ``--smoke`` (the default on a CPU) runs every part at tiny
sizes in fp32, for CI. Compile times are reported apart from the medians (warm-up runs first);
``JAX_COMPILATION_CACHE_DIR`` (the launcher sets it) keeps a rerun from compiling again.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax

from sfv_jax.bench import common, pipeline, train, unet

PARTS = ("unet_cudnn", "unet_xla", "pipeline_1step", "train_sfv", "train_diffusion")


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def part_args(smoke: bool) -> dict[str, tuple]:
    """Each part's benchmark function and its arguments (full size on a GPU, tiny with ``smoke``)."""
    size = dict(height=32, width=32, frames=3) if smoke else dict(height=576, width=1024, frames=14)
    dtype = "float32" if smoke else "bfloat16"
    unet_kw = dict(config="tiny_a" if smoke else "svd", dtype=dtype, batch=1, repeats=2 if smoke else 5, warmup=1)
    train_kw = dict(
        config="tiny" if smoke else "svd",
        mesh="data=1,fsdp=1",
        dtype=dtype,
        remat=None,
        height=None if smoke else 448,
        width=None if smoke else 768,
        frames=None if smoke else 14,
        batch=1,
        accum=2 if smoke else 1,  # smoke: the tiny config's own steps (CI's tests compiled them already)
        repeats=1 if smoke else 3,  # smoke: one timed iteration after the compiling one (a CPU at -O0: ~7 s each)
        peak_tflops=None,
        no_torch=True,
        trainable="all",
    )
    return {
        "unet_cudnn": (unet.bench_unet, _args(**unet_kw, **size, attention=None if smoke else "cudnn")),
        "unet_xla": (unet.bench_unet, _args(**unet_kw, **size, attention="chunked" if smoke else "xla")),
        "pipeline_1step": (
            pipeline.bench_pipeline,
            _args(
                config="tiny" if smoke else "svd",
                dtype=dtype,
                **size,
                steps=1,
                min_guidance_scale=1.0,
                max_guidance_scale=1.0,
                repeats=2 if smoke else 3,
                warmup=1,
            ),
        ),
        "train_sfv": (train.bench_train, _args(**train_kw, objective="sfv")),
        "train_diffusion": (train.bench_train, _args(**train_kw, objective="diffusion")),
    }


def _row(name: str, r: dict) -> str:
    if not r.get("ok"):
        return f"| {name} | failed | {r.get('error', '')[:100]} |"
    if name.startswith("unet"):
        return (
            f"| {name} | {r['flax_s']:.4f} s (diffusers {r['torch_s']:.4f} s, ratio {r['ratio']:.2f}) | "
            f"{r['flax_tflops_per_s']:.3g} TFLOP/s; compile {r['compile_s']:.0f} s |"
        )
    if name.startswith("pipeline"):
        stages = ", ".join(f"{k} {v:.3f}" for k, v in r["flax"].items() if k != "total")
        return (
            f"| {name} | {r['flax']['total']:.4f} s (diffusers {r['torch']['total']:.4f} s, ratio {r['ratio']:.2f}) "
            f"| {stages} |"
        )
    mem = (
        f"peak {r['measured_peak_bytes'] / 1e9:.3g} GB measured, "
        if r.get("measured_peak_bytes")
        else "peak not reported by the device, "
    ) + f"{r['planned_peak_bytes'] / 1e9:.3g} GB planned"
    util = f"MFU {r['mfu']:.2f}" if "mfu" in r else f"{r['tflops_per_device']:.3g} TFLOP/s"
    return f"| {name} | {r['iteration_s']:.4f} s ({util}; compile {r['compile_s']:.0f} s) | {mem} |"


def bench_check(args) -> dict:
    smoke = args.smoke or not common.on_gpu()
    device = jax.devices()[0].device_kind
    print(f"[check] device {device} ({jax.default_backend()}), jax {jax.__version__}, smoke={smoke}", flush=True)
    todo = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [p for p in todo if p not in PARTS]
    if unknown:
        raise SystemExit(f"error: --parts: unknown {unknown}; choose from {','.join(PARTS)}")
    results: dict[str, dict] = {}
    out = Path(args.json) if args.json else None
    for name in todo:
        fn, fn_args = part_args(smoke)[name]
        print(f"[check] --- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn(fn_args)}
        except BaseException as e:  # noqa: BLE001 (a part's failure, even a SystemExit, must not lose the rest)
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["wall_s"] = time.perf_counter() - t0
        if out:  # after every part: a run cut short keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            report = {"device": device, "backend": jax.default_backend(), "smoke": smoke, "parts": results}
            out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\n| part | time | detail |  ({device}, {'smoke' if smoke else 'full size'})\n|---|---|---|")
    for name, r in results.items():
        print(_row(name, r))
    failed = [n for n, r in results.items() if not r["ok"]]
    print(f"check_parts={len(results)} check_failed={len(failed)}" + (f" ({','.join(failed)})" if failed else ""))
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="the device check: UNet, pipeline, training steps, one table + JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes in fp32 (the default on a CPU)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--json", default=None, help="write the results here (after every part)")
    p.set_defaults(run=bench_check)
