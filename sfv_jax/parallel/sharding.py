"""Device meshes, logical-axis rules and the shardings of every array the trainer holds.

The mesh has three named axes (``jax.make_mesh`` with explicit ``Auto`` axis types, i.e. GSPMD):

  ``data``    pure data parallelism: parameters replicated, the batch split
  ``fsdp``    fully sharded data parallelism (ZeRO-3): the batch split *and* every large parameter,
              EMA, optimizer and gradient leaf split, gathered layer by layer by XLA when used
  ``tensor``  tensor parallelism of attention heads / MLP hidden units (size 1 unless set; a UNet this
              size is conv-dominated and gains little from it)

Parameters carry *logical* axis names (``sfv_jax.models.primitives``); ``config.sharding.rules`` maps
them, and the activations' names (``activation_batch`` ...), to mesh axes. A dimension is sharded only
when the mesh axes divide it; a leaf smaller than ``min_shard_size`` elements stays replicated; a
larger leaf the rules leave without an ``fsdp`` split has its largest divisible dimension split over
``fsdp`` (``fsdp_fallback``), so that with ``fsdp = n`` every large leaf takes about 1/n of its bytes
per device. Optimizer states (any optax state: full-shape moments, SM3's per-dimension accumulators)
inherit the sharding of the parameter they belong to, matched by tree path.

    plan = sharding.Plan.from_config(config)          # mesh + rules; one per run
    shard = plan.param_shardings(boxed_abstract)       # tree of NamedSharding
    with plan.context():                               # mesh + rules active while steps trace
        state, metrics = steps.generator_step(state, batch, backbone)

Multi-host: :func:`initialize_distributed` (from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, or a SLURM job) joins the processes; :meth:`Plan.local_rows` says which rows of a
global batch this process feeds, :meth:`Plan.global_batch` assembles the global ``jax.Array``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination-service client (barriers)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# logical name -> mesh axis (or axes, or None). Parameters first, then activations.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("norm", None),
    ("scalar", None),
    ("kernel_t", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("activation_batch", BATCH_AXES),
    ("activation_frames", None),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_embed", None),
)


class ShardingError(ValueError):
    """A mesh or sharding setting that cannot work (the message names the ``--config.`` flag)."""


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """``config.mesh``: the size of each axis; one may be -1 (all remaining devices)."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def sharding_config() -> ml_collections.ConfigDict:
    """``config.sharding``: logical-axis rules and the size threshold of parameter sharding."""
    c = ml_collections.ConfigDict()
    c.rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])] for r in DEFAULT_RULES]
    c.min_shard_size = 2**14  # leaves with fewer elements stay replicated
    c.fsdp_fallback = True  # large leaves the rules leave unsplit: largest divisible dim over fsdp
    return c


def parse_mesh(spec: str) -> dict[str, int]:
    """``"fsdp=8"`` / ``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` (unnamed axes: 1)."""
    out = {a: 1 for a in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in MESH_AXES:
            raise ShardingError(f"--mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE] with AXIS in {MESH_AXES}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ShardingError(f"--mesh {spec!r}: {value!r} is not an integer") from None
    return out


def resolve_mesh_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill in the one ``-1`` axis and check that the product is the device count."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ShardingError(f"--config.mesh={sizes}: sizes must be >= 1, and at most one axis -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ShardingError(f"--config.mesh={sizes}: {n_devices} devices are not a multiple of {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ShardingError(
            f"--config.mesh={sizes}: needs {math.prod(sizes.values())} devices, "
            f"{n_devices} are present (jax.device_count())"
        )
    return sizes


def initialize_distributed() -> bool:
    """Join a multi-process run before JAX is used; returns whether one was joined.

    * ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i`` (any launcher), or
    * a SLURM job step with more than one task (``srun``): JAX reads the SLURM variables itself.
    Otherwise (one process) nothing happens."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing:
            raise ShardingError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        jax.distributed.initialize()
    else:
        return False
    logging.info(
        "process %d of %d joined; %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


BARRIER_TIMEOUT_S = 3600.0


def lock_part() -> str:
    """What tells one process's output lock from its peers' in a multi-process run (``.process3``); one
    process: "" (see :class:`sfv_jax.paths.OutputLock`)."""
    return f".process{jax.process_index()}" if jax.process_count() > 1 else ""


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process of a multi-process run reaches ``name``; one process: nothing.

    This is the coordination service's barrier, not a collective: the first collective over a group of
    processes sets up the CPU collectives (Gloo) with a fixed 30-s deadline, which processes that reach
    it at different times (one still compiling, on a loaded machine) miss. The trainer meets here after
    every process has compiled its steps."""
    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    client.wait_at_barrier(f"sfv_jax/{name}", int(timeout_s * 1000))


def _key_name(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _path(path: Sequence[Any]) -> tuple:
    return tuple(_key_name(k) for k in path)


class Plan:
    """A mesh and its rules: computes the shardings of parameters, states and batches."""

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
        min_shard_size: int = 2**14,
        fsdp_fallback: bool = True,
    ):
        self.mesh = mesh
        self.rules = tuple((str(name), tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)
        self.min_shard_size = int(min_shard_size)
        self.fsdp_fallback = fsdp_fallback
        self._rule: dict[str, Any] = {}
        for name, axes in self.rules:
            self._rule.setdefault(name, axes)  # the first rule of a name wins

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Plan:
        devices = jax.devices() if devices is None else devices
        shape = resolve_mesh_shape(config.mesh.to_dict(), len(devices))
        return cls(
            make_mesh(shape, devices),
            config.sharding.rules,
            config.sharding.min_shard_size,
            config.sharding.fsdp_fallback,
        )

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split (devices along ``data`` x ``fsdp``)."""
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, batch_dim: int = 1) -> NamedSharding:
        """A batch with the samples on axis ``batch_dim`` (train_steps' ``[k, m, ...]`` layout: 1)."""
        return NamedSharding(self.mesh, P(*([None] * batch_dim), BATCH_AXES))

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical rules, active while jitted steps trace (activation constraints)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def describe(self) -> str:
        return " x ".join(f"{a}={s}" for a, s in self.mesh.shape.items()) + f" ({self.mesh.devices.size} devices)"

    # ------------------------------------------------------------------ parameters
    def spec(self, logical: Sequence[str | None] | None, shape: Sequence[int]) -> P:
        """The mesh ``PartitionSpec`` of one leaf with logical axis names ``logical`` and ``shape``."""
        return leaf_spec(logical, shape, self._rule, dict(self.mesh.shape), self.min_shard_size, self.fsdp_fallback)

    def param_shardings(self, boxed: Any) -> Any:
        """Shardings of a parameter tree whose leaves carry logical names (``nn.LogicallyPartitioned``
        boxes, e.g. ``jax.eval_shape(model.init, ...)["params"]``); unboxed leaves: no names."""

        def one(x):
            if isinstance(x, nn.Partitioned):
                return NamedSharding(self.mesh, self.spec(x.names, x.value.shape))
            return NamedSharding(self.mesh, self.spec(None, x.shape))

        return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def like_params(self, tree: Any, params: Any, param_shardings: Any) -> Any:
        """Shardings of ``tree`` (an optimizer state, an EMA, a gradient: anything whose leaves belong to
        parameters of ``params``): a leaf whose tree path ends with a parameter's path and has its shape
        takes that parameter's sharding; a vector ending in ``(..., param path, i)`` of length
        ``shape[i]`` (SM3's per-dimension accumulators) takes the spec of dimension i; the rest
        (counts, scalars) is replicated."""
        table = {}
        for (path, p), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings), strict=True
        ):
            table[_path(path)] = (tuple(p.shape), s.spec)

        def one(path, x):
            keys, shape = _path(path), tuple(x.shape)
            for start in range(len(keys)):
                hit = table.get(keys[start:])
                if hit and hit[0] == shape:
                    return NamedSharding(self.mesh, hit[1])
                hit = table.get(keys[start:-1]) if isinstance(keys[-1], int) else None
                if hit and len(shape) == 1 and keys[-1] < len(hit[0]) and shape[0] == hit[0][keys[-1]]:
                    spec = tuple(hit[1]) + (None,) * (len(hit[0]) - len(tuple(hit[1])))
                    return NamedSharding(self.mesh, P(spec[keys[-1]]))
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, tree)

    # ------------------------------------------------------------------ batches across processes
    def local_rows(self, global_rows: int, batch_dim: int = 1, ndim: int = 2) -> np.ndarray:
        """Indices (sorted) of the rows of a global batch of ``global_rows`` samples that this process's
        devices hold: the samples it must load. Processes get disjoint sets that cover the batch."""
        if global_rows % self.batch_shards:
            raise ShardingError(
                f"global batch of {global_rows} samples does not split over "
                f"{self.batch_shards} batch shards ({self.describe()})"
            )
        shape = (1,) * batch_dim + (global_rows,) + (1,) * (ndim - batch_dim - 1)
        rows: set[int] = set()
        for index in self.batch_sharding(batch_dim).addressable_devices_indices_map(shape).values():
            rows.update(range(*index[batch_dim].indices(global_rows)))
        return np.array(sorted(rows), np.int64)

    def global_batch(self, local: Mapping[str, np.ndarray], global_rows: int, batch_dim: int = 1) -> dict:
        """This process's rows (``local_rows`` order) of every batch array -> global ``jax.Array``s split
        over the batch axes."""
        out = {}
        for k, v in local.items():
            v = np.asarray(v)
            shape = v.shape[:batch_dim] + (global_rows,) + v.shape[batch_dim + 1 :]
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding(batch_dim), v, shape)
        return out


def leaf_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    rules: Mapping[str, Any],
    mesh_shape: Mapping[str, int],
    min_shard_size: int = 2**14,
    fsdp_fallback: bool = True,
) -> P:
    """The mesh ``PartitionSpec`` of a leaf (pure; :meth:`Plan.spec` binds the plan's settings).

    Each dimension takes the mesh axes its logical name maps to (``rules``: name -> axis, axes or None),
    unless an axis is already used by an earlier dimension, has size 1, or the axes do not divide the
    dimension. Leaves under ``min_shard_size`` elements are replicated. ``fsdp_fallback``: a leaf left
    without an ``fsdp`` split gets its largest ``fsdp``-divisible free dimension split over ``fsdp``."""
    if math.prod(shape) < min_shard_size:
        return P()
    names = tuple(logical or ())
    names = names + (None,) * (len(shape) - len(names))
    used: set[str] = set()
    out: list[Any] = []
    for name, dim in zip(names, shape):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh_shape.get(a, 1) > 1)
        if axes and dim % math.prod(mesh_shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    n = mesh_shape.get("fsdp", 1)
    if fsdp_fallback and n > 1 and "fsdp" not in used:
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if out[i] is None and shape[i] % n == 0:
                out[i] = "fsdp"
                break
    return P(*out)


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """``jax.make_mesh`` over ``MESH_AXES`` with explicit ``Auto`` axis types (GSPMD propagation)."""
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)
