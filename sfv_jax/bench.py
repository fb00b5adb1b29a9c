"""Benchmarks (never timed tests): ``python -m sfv_jax.bench unet [--config small|svd|tiny_a|tiny_b] ...``

Times the jitted Flax UNet forward (after warm-up, median of repeats) and diffusers' PyTorch forward
on the same config, weights and inputs, on this machine, and prints both and their ratio
(flax / torch: below 1.0 means Flax is faster). Default: the ``small`` config in fp32 on a CPU; the
full SVD UNet at 1024x576x14 in bf16 where a GPU is present. Needs the test requirements (torch,
diffusers) for the reference side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sfv_jax import convert, pretrained
from sfv_jax import torch_reference as ref

# SVD's structure at a fifth of its width: big enough that kernels, not dispatch, dominate on a CPU.
SMALL: dict[str, Any] = {**ref.SVD_UNET_CONFIG, "block_out_channels": [64, 128, 256, 256],
                         "num_attention_heads": [2, 4, 8, 8], "cross_attention_dim": 256,
                         "addition_time_embed_dim": 64, "projection_class_embeddings_input_dim": 192}
CONFIGS = {"small": SMALL, "svd": ref.SVD_UNET_CONFIG, **ref.TINY_CONFIGS}


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_unet(args) -> dict:
    import torch

    gpu = jax.default_backend() == "gpu"
    config = CONFIGS[args.config or ("svd" if gpu else "small")]
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype_name]
    height, width = (args.height or (576 if gpu else 256)), (args.width or (1024 if gpu else 256))
    frames, batch = args.frames or config["num_frames"], args.batch
    h, w = height // 8, width // 8
    print(f"[bench] unet config={args.config or ('svd' if gpu else 'small')} {batch}x{frames}x{height}x{width} "
          f"(latent {h}x{w}) {dtype_name} jax={jax.__version__} backend={jax.default_backend()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    tmodel = ref.build_unet(config)
    model = pretrained.unet_from_config(config, dtype=jdtype, attention_impl=args.attention)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(state, pretrained.abstract_params(model)))
    del state
    print(f"[bench] built and converted weights in {time.perf_counter() - t0:.1f}s", flush=True)

    inputs = ref.unet_inputs(config, batch, frames, h, w)
    jinputs = [jnp.asarray(x) for x in inputs]
    fwd = jax.jit(model.apply)
    t0 = time.perf_counter()
    compiled = fwd.lower({"params": params}, *jinputs).compile()
    compile_s = time.perf_counter() - t0
    flax_s, flax_all = _median_time(lambda: compiled({"params": params}, *jinputs).block_until_ready(),
                                    args.repeats, args.warmup)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device, tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def torch_fwd():
        ref.unet_forward(tmodel, *inputs)
        sync()

    torch_s, torch_all = _median_time(torch_fwd, args.repeats, args.warmup)
    ratio = flax_s / torch_s
    print(f"[bench] flax   : {flax_s:.4f} s median of {args.repeats} (compile {compile_s:.1f}s; "
          f"all {[round(t, 4) for t in flax_all]})")
    print(f"[bench] pytorch: {torch_s:.4f} s median of {args.repeats} on {device} "
          f"(all {[round(t, 4) for t in torch_all]})")
    print(f"unet_flax_s={flax_s:.4f} unet_torch_s={torch_s:.4f} ratio_flax_over_torch={ratio:.3f}")
    return {"flax_s": flax_s, "torch_s": torch_s, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfv_jax.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("unet", help="one UNet forward: Flax (jit) vs diffusers (PyTorch)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: svd on GPU, small on CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="pixel height (latent = /8); default 576 GPU, 256 CPU")
    p.add_argument("--width", type=int, default=None, help="pixel width; default 1024 GPU, 256 CPU")
    p.add_argument("--frames", type=int, default=None, help="default: the config's num_frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attention", choices=["xla", "cudnn", "chunked"], default=None, help="jax attention implementation")
    args = parser.parse_args(argv)
    if args.what == "unet":
        bench_unet(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
