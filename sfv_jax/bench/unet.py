"""``sfv-bench unet``: the jitted Flax UNet forward against diffusers' PyTorch forward on the same config,
weights and inputs (after warm-up, median of repeats); prints ``ratio_flax_over_torch`` (below 1: Flax
is faster). Default: the ``small`` preset in fp32 on a CPU, full SVD size in bf16 on a GPU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from sfv_jax.bench import common
from sfv_jax.checkpoint import convert
from sfv_jax.models import presets
from sfv_jax.models.build import DTYPES, abstract_params, unet_from_config
from sfv_jax.testing import require_dev_extras
from sfv_jax.testing import torch_reference as ref
from sfv_jax.timing import median_time

CONFIGS = ("tiny_a", "tiny_b", "small", "svd", "svd_xt")


def bench_unet(args) -> dict:
    require_dev_extras("sfv-bench unet")
    import torch

    name = args.config or common.default_preset()
    config = presets.UNETS[name]
    dtype_name = common.default_dtype(args.dtype)
    height, width = common.default_size(args.height, args.width)
    frames, batch = args.frames or config["num_frames"], args.batch
    h, w = height // 8, width // 8
    print(
        f"[bench] unet config={name} {batch}x{frames}x{height}x{width} (latent {h}x{w}) {dtype_name} "
        f"jax={jax.__version__} backend={jax.default_backend()} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )

    t0 = time.perf_counter()
    tmodel = ref.build_unet(config)
    model = unet_from_config(config, dtype=DTYPES[dtype_name], attention_impl=args.attention)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(state, abstract_params(model)))
    del state
    print(f"[bench] built and converted weights in {time.perf_counter() - t0:.1f}s", flush=True)

    inputs = ref.unet_inputs(config, batch, frames, h, w)
    jinputs = [jnp.asarray(x) for x in inputs]
    t0 = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, *jinputs).compile()
    compile_s = time.perf_counter() - t0
    flax = median_time(lambda: compiled({"params": params}, *jinputs), args.repeats, args.warmup)

    device, sync = common.torch_device()
    tmodel = tmodel.to(device, common.torch_dtype(dtype_name))

    def torch_fwd():
        ref.unet_forward(tmodel, *inputs)
        sync()

    tch = median_time(torch_fwd, args.repeats, args.warmup)
    ratio = flax.median_s / tch.median_s
    print(
        f"[bench] flax   : {flax.median_s:.4f} s median of {args.repeats} (compile {compile_s:.1f}s; "
        f"all {[round(t, 4) for t in flax.times_s]})"
    )
    print(
        f"[bench] pytorch: {tch.median_s:.4f} s median of {args.repeats} on {device} "
        f"(all {[round(t, 4) for t in tch.times_s]})"
    )
    flops = common.flops(compiled)
    print(
        f"unet_flax_s={flax.median_s:.4f} unet_torch_s={tch.median_s:.4f} ratio_flax_over_torch={ratio:.3f} "
        f"flops={flops:.4g} flax_tflops_per_s={flops / flax.median_s / 1e12:.2f}"
    )
    return {
        "flax_s": flax.median_s,
        "torch_s": tch.median_s,
        "ratio": ratio,
        "compile_s": compile_s,
        "flops": flops,
        "flax_tflops_per_s": flops / flax.median_s / 1e12,
        "attention": args.attention,
    }


def add_parser(sub) -> None:
    p = sub.add_parser("unet", help="one UNet forward: Flax (jit) vs diffusers (PyTorch)")
    p.add_argument("--config", choices=CONFIGS, default=None, help="preset; default: svd on GPU, small on CPU")
    common.add_size_args(p, frames_help="default: the config's num_frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--attention", choices=["xla", "cudnn", "chunked"], default=None, help="jax attention implementation"
    )
    p.set_defaults(run=bench_unet)
