"""Compile targets: the accelerators sfv_jax is built for, as named data, and ahead-of-time compilation of
any jitted program for them on a host that has none of them (deviceless compilation).

    devices = targets.topology("h100", 16)               # 16 abstract H100s (two hosts of 8)
    plan = sharding.Plan(sharding.make_mesh({"fsdp": 8, "data": 2}, devices))
    compiled = targets.compile(step, *abstract_args, mesh=plan.mesh)   # XLA:GPU's real pipeline
    compiled.memory_analysis()                            # per-device bytes from the target's compiler

A GPU target is the description XLA's GPU compiler reads instead of a device (``GpuTargetConfigProto``:
compute capability, SM count, shared memory, memory size, cuDNN version), with the vendor's published
figures; a TPU target is a topology name that libtpu's compiler knows (``v5p:2x2x2``). The compilers come
from the ``targets`` extra (``pip install -e .[targets]``: the CUDA 13 PJRT plugin with the NVIDIA wheels
its compiler needs, and libtpu); JAX itself runs on the CPU (``JAX_PLATFORMS=cpu``), so nothing is
executed and no accelerator is needed. ``memory_analysis()`` works for both kinds; ``cost_analysis()``
(FLOPs) only for TPUs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# No JAX import at module level: ``prepare_environment`` must run before JAX starts (``sfv-memory`` calls
# it first), and the target table is plain data.


class TargetError(ValueError):
    """An unknown target, an impossible device count, or a compiler that is not installed."""


@dataclass(frozen=True)
class Target:
    """One accelerator kind. ``memory_gb``: the device memory a plan must fit in (the vendor's figure,
    1e9 bytes); ``per_host``: devices of one host (a multi-host mesh is ``hosts x per_host``)."""

    name: str
    platform: str  # "cuda" | "tpu"
    kind: str  # the device kind the compiler reports
    memory_gb: float
    per_host: int
    # GPU: the GpuTargetConfigProto fields (SM count, shared memory per SM / block, L2, clocks, bandwidth)
    compute_capability: tuple[int, int] = (0, 0)
    sm_count: int = 0
    fpus_per_sm: int = 0
    shared_memory_per_sm: int = 0
    shared_memory_per_block_optin: int = 0
    l2_bytes: int = 0
    clock_ghz: float = 0.0
    bandwidth_bytes_s: float = 0.0
    memory_bytes: int = 0  # what the CUDA driver reports as total memory
    # TPU: the topology's generation name ("v5p", "v6e", "v5e") and whether its chips form a 3-D torus
    tpu_generation: str = ""
    torus_3d: bool = False

    def gpu_target_config(self) -> str:
        """The text ``GpuTargetConfigProto`` that XLA:GPU compiles against (no device needed)."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth_bytes_s)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{self.kind}"
"""

    def tpu_topology(self, n: int) -> str:
        """The topology name of ``n`` chips (``v5p:2x2x2``): the most compact torus or grid shape."""
        dims = 3 if self.torus_3d else 2
        shape = [1] * dims
        k = 0
        while math.prod(shape) < n:
            shape[k % dims] *= 2
            k += 1
        if math.prod(shape) != n:
            raise TargetError(f"--target {self.name}: {n} chips is not a power of two (TPU slices are)")
        shape = sorted(shape)  # 2x4, 2x2x4, 2x4x4: the names the TPU slices go by
        if dims == 3 and n == 4:  # except one v5p host of 4 chips: 2x2x1
            shape = [2, 2, 1]
        return f"{self.tpu_generation}:" + "x".join(str(s) for s in shape)


_HOPPER = dict(
    compute_capability=(9, 0),
    sm_count=132,
    fpus_per_sm=128,
    shared_memory_per_sm=233472,
    shared_memory_per_block_optin=232448,
    l2_bytes=50 * 2**20,
    clock_ghz=1.98,
)
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "h100",
            "cuda",
            "NVIDIA H100 80GB HBM3",
            80,
            8,
            bandwidth_bytes_s=3.35e12,
            memory_bytes=84942979072,
            **_HOPPER,
        ),
        Target(
            "h200",
            "cuda",
            "NVIDIA H200 141GB HBM3e",
            141,
            8,
            bandwidth_bytes_s=4.8e12,
            memory_bytes=151397597184,
            **_HOPPER,
        ),
        Target(
            "a100",
            "cuda",
            "NVIDIA A100-SXM4-80GB",
            80,
            8,
            compute_capability=(8, 0),
            sm_count=108,
            fpus_per_sm=64,
            shared_memory_per_sm=167936,
            shared_memory_per_block_optin=166912,
            l2_bytes=40 * 2**20,
            clock_ghz=1.41,
            bandwidth_bytes_s=2.04e12,
            memory_bytes=85100068864,
        ),
        Target("v5p", "tpu", "TPU v5", 95, 4, tpu_generation="v5p", torus_3d=True),
        Target("v6e", "tpu", "TPU v6 lite", 32, 8, tpu_generation="v6e"),
        Target("v5e", "tpu", "TPU v5 lite", 16, 8, tpu_generation="v5e"),
    )
}
GPU_TARGETS = tuple(n for n, t in TARGETS.items() if t.platform == "cuda")
TPU_TARGETS = tuple(n for n, t in TARGETS.items() if t.platform == "tpu")
INSTALL_HINT = "pip install -e '.[targets]' (or: bash launch/setup.sh --targets)"


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"--target {name!r}: not one of {', '.join(TARGETS)}") from None


# XLA:GPU's Triton GEMM emitter picks its tile sizes by autotuning on the device; without one it falls back
# to a default tiling that fails on some of SVD's projection shapes ("Couldn't find output tile sizes",
# seen on bf16[129024,320] at 1024x576x14), so deviceless GPU compiles use cuBLAS GEMMs (whose algorithm
# is chosen when the program runs), as the public deviceless examples do.
DEVICELESS_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def prepare_environment() -> None:
    """Environment for deviceless compilation, set before JAX starts: JAX runs on the CPU (the plugins'
    own device discovery would fail or print noise), the CUDA plugin skips its driver-version check, the
    GPU compiler's flags of :data:`DEVICELESS_XLA_FLAGS`, and libtpu's settings (:func:`_tpu_environment`)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in DEVICELESS_XLA_FLAGS:
        if not any(f.startswith(flag.split("=")[0] + "=") for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    _tpu_environment()


def _tpu_environment() -> None:
    """libtpu, loaded to compile on a host that is not a TPU VM: no metadata-server query, and several
    processes may load it at once (by default the first holds /tmp/libtpu_lockfile and the others abort)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compiler_installed(target: Target) -> bool:
    """Whether the compiler for ``target`` can be loaded (the ``targets`` extra is installed)."""
    import importlib.util

    module = "jax_plugins.xla_cuda13" if target.platform == "cuda" else "libtpu"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def topology(name: str, n: int) -> list[Any]:
    """``n`` abstract devices of target ``name`` (GPUs: ``ceil(n / per_host)`` hosts; TPUs: the slice of
    ``n`` chips), for meshes and shardings that compile but never run."""
    from jax.experimental import topologies

    target = get(name)
    if n < 1:
        raise TargetError(f"--target {name}: a mesh needs at least one device, got {n}")
    if not compiler_installed(target):
        raise TargetError(f"--target {name}: the {target.platform.upper()} compiler is not installed; {INSTALL_HINT}")
    if target.platform == "cuda":
        hosts, per_host = (1, n) if n <= target.per_host else (math.ceil(n / target.per_host), target.per_host)
        if hosts * per_host != n:
            raise TargetError(f"--target {name}: {n} GPUs do not fill hosts of {target.per_host}")
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=target.gpu_target_config(), topology=f"{hosts}x1x{per_host}"
        )
    else:
        _tpu_environment()  # read when the TPU plugin first loads, i.e. here
        if n < target.per_host and target.per_host == 4 or n < 4:
            raise TargetError(f"--target {name}: a TPU slice has at least 4 chips, got a mesh of {n}")
        desc = topologies.get_topology_desc(target.tpu_topology(n), "tpu")
    devices = list(desc.devices)
    if len(devices) != n:
        raise TargetError(f"--target {name}: the compiler's topology has {len(devices)} devices, not {n}")
    return devices


def compile(fn, *args, mesh=None, rules: Sequence | None = None):  # noqa: A001
    """Lower and compile jitted ``fn`` on abstract ``args`` (``ShapeDtypeStruct``s whose shardings name the
    target's devices) under ``mesh`` (a ``jax.sharding.Mesh``) and Flax's logical ``rules``: the target's
    compiled executable."""
    import flax.linen as nn
    import jax

    if mesh is None:
        return fn.lower(*args).compile()
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules or ())):
        return fn.lower(*args).compile()


def flops(compiled) -> float | None:
    """FLOPs of a compiled program where its compiler reports them (TPU), else None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning None
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
