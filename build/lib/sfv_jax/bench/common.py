"""What every benchmark shares: the device defaults (full SVD size in bf16 where a GPU is present, reduced
sizes in fp32 on a CPU), the dtype pairs of JAX and PyTorch, peak FLOP/s per device, XLA's FLOP count.
The timer is :func:`sfv_jax.timing.median_time`."""

from __future__ import annotations

import jax

from sfv_jax.models.build import COMPUTE_DTYPES

# Peak dense bf16 FLOP/s per device, by jax device_kind prefix (vendor data sheets).
PEAK_BF16 = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def default_preset(cpu: str = "small") -> str:
    """The model size a benchmark runs by default: ``svd`` on a GPU, ``cpu`` elsewhere."""
    return "svd" if on_gpu() else cpu


def default_dtype(name: str | None) -> str:
    return name or ("bfloat16" if on_gpu() else "float32")


def default_size(height: int | None, width: int | None) -> tuple[int, int]:
    """Pixel (height, width): 576x1024 on a GPU, 256x256 on a CPU, unless given."""
    gpu = on_gpu()
    return height or (576 if gpu else 256), width or (1024 if gpu else 256)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def torch_device() -> tuple[str, object]:
    """(device, synchronize) of the PyTorch reference: CUDA when present."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.synchronize
    return "cpu", lambda: None


def flops(lowered_or_compiled) -> float:
    """XLA's FLOP count of a lowered or compiled function."""
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def add_size_args(p, *, frames_help: str) -> None:
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="pixel height; default 576 GPU, 256 CPU")
    p.add_argument("--width", type=int, default=None, help="pixel width; default 1024 GPU, 256 CPU")
    p.add_argument("--frames", type=int, default=None, help=frames_help)
