"""PyTorch (diffusers safetensors) <-> Flax parameter conversion, and the converted-checkpoint format.

Usage:
  python -m sfv_jax.cli.convert --src path/to/stable-video-diffusion --out converted/svd  # the whole pipeline
  python -m sfv_jax.cli.convert --src path/to/svd/unet --out converted/unet                 # one component
  python -m sfv_jax.cli.convert --to-diffusers --src converted/svd --out exported/svd      # Flax -> PyTorch formats

Key mapping (docs/svd_port.md, "Checkpoint conversion"): the Flax module tree mirrors the PyTorch names, with
list indices joined by '_' (``down_blocks.0.resnets.1`` <-> ``down_blocks_0/resnets_1``); leaves ``kernel``/``scale``/
``embedding`` <-> ``weight``. Linear [out, in] -> [in, out]; Conv2d [O, I, kh, kw] -> [kh, kw, I, O];
Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]. Every key and shape is checked against
``jax.eval_shape`` of the Flax model before any tensor is read; all problems are reported at once.

A converted checkpoint is a folder: ``config.json`` (the diffusers config), ``sfv_jax.json`` (format
metadata) and ``params/`` (an orbax checkpoint). It is written to a temporary folder and renamed into
place, so an interrupted conversion never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from sfv_jax.checkpoint.components import (
    COMPONENTS,
    CONFIG_ONLY,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    PIPELINE_CLASSES,
    PIPELINE_INDEX,
    Component,
    check_pipeline_folder,
    component_folder,
    detect_component,
    is_converted,
    is_pipeline_folder,
    read_config,
    read_meta,
)
from sfv_jax.checkpoint.safetensors_io import CheckpointError, open_weights, save_file
from sfv_jax.paths import check_free_space, output_overlaps, staged_folder

CONTAINERS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "temporal_transformer_blocks",
        "net",
        "to_out",
        "layers",
    }
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Flax kernel rank -> permutation taking the PyTorch tensor to the Flax one.
_TO_FLAX = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}
IGNORED_TORCH_KEYS = ("position_ids",)  # buffers some exports carry; never parameters


def torch_key(flax_path: tuple[str, ...]) -> str:
    """``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> ``'down_blocks.0.resnets.1.conv1.weight'``."""
    parts = []
    for name in flax_path[:-1]:
        head, _, tail = name.rpartition("_")
        parts.append(f"{head}.{tail}" if head in CONTAINERS and tail.isdigit() else name)
    parts.append(_LEAF_TO_TORCH.get(flax_path[-1], flax_path[-1]))
    return ".".join(parts)


def _perm(flax_path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    return _TO_FLAX.get(ndim) if flax_path[-1] == "kernel" else None


@dataclasses.dataclass(frozen=True)
class Entry:
    flax_path: tuple[str, ...]
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    perm: tuple[int, ...] | None


def layout(abstract_params: Mapping) -> dict[str, Entry]:
    """PyTorch key -> where and how it lands in the (unboxed) Flax parameter tree."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(abstract_params)).items():
        shape = tuple(leaf.shape)
        perm = _perm(path, len(shape))
        torch_shape = shape if perm is None else tuple(shape[perm.index(i)] for i in range(len(shape)))
        out[torch_key(path)] = Entry(path, shape, torch_shape, perm)
    return out


def check_compatible(shapes: Mapping[str, tuple[int, ...]], plan: Mapping[str, Entry], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    present = {k for k in shapes if k.rsplit(".", 1)[-1] not in IGNORED_TORCH_KEYS}
    missing = sorted(set(plan) - present)
    unexpected = sorted(present - set(plan))
    wrong = sorted(
        f"{k}: checkpoint {list(shapes[k])}, model expects {list(plan[k].torch_shape)}"
        for k in present & set(plan)
        if tuple(shapes[k]) != plan[k].torch_shape
    )
    if missing or unexpected or wrong:
        lines = [
            f"{what}: the checkpoint does not match the model config "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape)"
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            lines += [f"  {title}: {item}" for item in items[:50]]
            if len(items) > 50:
                lines.append(f"  ... and {len(items) - 50} more {title}")
        raise CheckpointError("\n".join(lines))


def tensor_problem(key: str, arr: np.ndarray, dtype: Any) -> str | None:
    """Why the weight ``key`` cannot become a float parameter of ``dtype`` (None keeps its own dtype), or
    None: an integer or bool tensor (casting would change its meaning: an int8 weight's values become
    garbage, not weights), non-finite values (a NaN weight makes black videos without a word), or values
    outside ``dtype``'s range (they would become inf)."""
    a = np.asarray(arr)
    if a.dtype.kind in "iub":
        return f"{key}: {a.dtype} tensor where the model has float weights (quantised or not a weight?)"
    if a.dtype.kind not in "fV":
        return f"{key}: dtype {a.dtype} is not a float"
    x = a.astype(np.float32) if a.dtype.kind == "V" else a  # bfloat16 & co.
    finite = np.isfinite(x)
    if not finite.all():
        bad = x.size - int(finite.sum())
        return f"{key}: {bad} of {x.size} values are not finite (NaN or inf)"
    if dtype is not None and x.size:
        big, limit = float(np.abs(x).max()), float(jnp.finfo(dtype).max)
        if big > limit:
            return f"{key}: values up to {big:.3g} do not fit {jnp.dtype(dtype).name} (max {limit:.3g})"
    return None


def raise_problems(problems: list[str], what: str) -> None:
    """One CheckpointError listing (up to 50 of) the tensors' problems, if there are any."""
    if problems:
        lines = [f"{what}: {len(problems)} weight tensor(s) refused"] + [f"  {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
        raise CheckpointError("\n".join(lines))


def _progress(n: int, desc: str, enabled: bool):
    return tqdm(total=n, desc=desc, unit="tensor", disable=not enabled, delay=1.0, file=sys.stderr)


def torch_to_flax(
    source: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    dtype: Any = jnp.float32,
    what: str = "checkpoint",
    progress: bool = True,
) -> dict:
    """Map a PyTorch state dict (numpy arrays; lazily read is fine) onto the Flax parameter tree.

    ``abstract_params``: unboxed ``jax.eval_shape`` params of the target module. Returns a nested dict
    of numpy arrays cast to ``dtype`` (``None`` keeps each tensor's dtype). Every tensor is checked first
    (:func:`tensor_problem`): integer / bool tensors, non-finite values and values beyond ``dtype``'s range
    are refused with one CheckpointError naming each tensor.
    """
    plan = layout(abstract_params)
    shapes = getattr(source, "shapes", None) or {k: tuple(np.shape(v)) for k, v in source.items()}
    check_compatible(shapes, plan, what)
    flat, problems = {}, []
    with _progress(len(plan), f"converting {what}", progress) as bar:
        for key, entry in plan.items():
            arr = np.asarray(source[key])
            if problem := tensor_problem(key, arr, dtype):
                problems.append(problem)
                bar.update()
                continue
            if entry.perm is not None:
                arr = arr.transpose(entry.perm)
            flat[entry.flax_path] = np.ascontiguousarray(arr if dtype is None else arr.astype(dtype))
            bar.update()
    raise_problems(problems, what)
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax`: PyTorch key -> numpy array (``dtype`` None keeps dtypes)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        arr = np.asarray(jax.device_get(leaf))
        perm = _perm(path, arr.ndim)
        if perm is not None:
            arr = arr.transpose(np.argsort(perm))
        out[torch_key(path)] = np.ascontiguousarray(arr if dtype is None else arr.astype(dtype))
    return out


# ----------------------------------------------------------------------------- converted checkpoints


def save_converted(
    out: str | os.PathLike,
    params: Mapping,
    config: Mapping,
    component: str,
    *,
    source: str = "",
    overwrite: bool = False,
    dtype: Any = None,
) -> Path:
    """Write ``params`` (+ diffusers ``config``) as a converted sfv_jax checkpoint folder, atomically;
    ``dtype`` (None: as they are) is the stored dtype (the loaders cast to their ``param_dtype``)."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), params)
    with staged_folder(out, overwrite) as tmp:
        leaves = jax.tree.leaves(params)
        # known before orbax starts writing: a full disk then fails here, not in its asynchronous writers
        check_free_space("--out", out, sum(x.size * x.dtype.itemsize for x in leaves) + (1 << 20))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "component": component,
            "source": source,
            "num_tensors": len(leaves),
            "num_params": int(sum(np.size(x) for x in leaves)),
            "param_dtypes": sorted({str(np.dtype(x.dtype)) for x in leaves}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def save_converted_pipeline(
    out: str | os.PathLike,
    parts: Mapping[str, tuple[Mapping, Mapping, str]],
    meta: dict,
    *,
    overwrite: bool = False,
    dtype: Any = None,
) -> Path:
    """Write a pipeline folder of components this project made itself (``parts``: component name ->
    (params, diffusers config, source)), with the SVD ``model_index.json`` and ``meta``, atomically;
    ``dtype`` as :func:`save_converted`."""
    out = Path(out).absolute()
    with staged_folder(out, overwrite) as tmp:
        for name, (params, config, source) in parts.items():
            save_converted(tmp / name, params, config, name, source=source, dtype=dtype)
        (tmp / PIPELINE_INDEX).write_text(json.dumps(PIPELINE_CLASSES, indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_converted(folder: str | os.PathLike, abstract_params: Mapping, component: str | None = None) -> dict:
    """Restore a converted checkpoint into the structure / dtypes / shardings of ``abstract_params``
    (its ``sfv_jax.json`` checked first, against ``component`` when given)."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    read_meta(folder, component)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(folder / "params", abstract_params)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder}: the converted checkpoint does not match the model config: {e}") from None
    # a converted folder is ours, but its weights may come from a diverged run: the same value checks
    # (the dtypes are the abstract tree's, so only finiteness can fail here)
    problems = []
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        shards = [s.data for s in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf]
        bad = sum(int(np.size(x) - np.isfinite(np.asarray(x)).sum()) for x in shards)  # this process's part
        if bad:
            problems.append(f"{torch_key(path)}: {bad} values are not finite (NaN or inf)")
    raise_problems(problems, str(folder))
    return params


def export_diffusers(
    params: Mapping,
    config: Mapping,
    out: str | os.PathLike,
    *,
    weights_name: str = "diffusion_pytorch_model.safetensors",
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as a diffusers component folder (``config.json`` + safetensors), atomically."""
    out = Path(out).absolute()
    with staged_folder(out, overwrite) as tmp:
        save_file(tmp / weights_name, flax_to_torch(params, dtype=dtype), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    return out


def convert_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    component: str | None = None,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """diffusers / transformers folder -> converted sfv_jax checkpoint at ``out``.

    ``src`` is a component folder (its kind is read from config.json unless ``component`` is given) or,
    with ``component=None``, a whole SVD pipeline folder: then every component is converted into
    ``out/<component>/`` and the config-only folders and ``model_index.json`` are copied.
    """
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: does not exist")
    if problem := output_overlaps("--out", out, {"--src": src}):
        raise CheckpointError(problem)
    if component is None and src.is_dir() and is_pipeline_folder(src):
        return convert_pipeline(src, out, variant=variant, dtype=dtype, overwrite=overwrite, progress=progress)
    if component is None:
        if src.is_file():
            raise CheckpointError(f"{src}: pass the folder that holds config.json and the weights, not a file")
        component = detect_component(read_config(src), src)
    comp = COMPONENTS[component]
    folder = component_folder(src, comp)
    if folder.is_file():
        raise CheckpointError(f"{folder}: pass the folder that holds config.json and the weights, not a file")
    config = read_config(folder)
    try:
        abstract = comp.abstract_params(config)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    weights = open_weights(folder, comp.weights_stem, variant)
    params = torch_to_flax(weights, abstract, dtype=dtype, what=f"{comp.name} {weights.description}", progress=progress)
    return save_converted(out, params, config, comp.name, source=str(folder.absolute()), overwrite=overwrite)


def write_pipeline(
    src: Path, out: Path, overwrite: bool, write_component: Callable[[Component, Path], None], meta: dict | None
) -> Path:
    """Stage a whole pipeline folder (each component via ``write_component``, configs copied), then
    rename it into place: a failure leaves nothing at ``out``."""
    check_pipeline_folder(src)
    out = Path(out).absolute()
    with staged_folder(out, overwrite) as tmp:
        for comp in COMPONENTS.values():
            write_component(comp, tmp / comp.subfolder)
        for name in CONFIG_ONLY:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        if (src / PIPELINE_INDEX).is_file():
            shutil.copy2(src / PIPELINE_INDEX, tmp / PIPELINE_INDEX)
        if meta is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def convert_pipeline(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """A diffusers SVD folder -> a converted pipeline folder (``unet/``, ``vae/``, ``image_encoder/``
    converted; ``model_index.json``, ``feature_extractor/``, ``scheduler/`` copied)."""
    src = Path(src)

    def write(comp: Component, dest: Path) -> None:
        convert_folder(src / comp.subfolder, dest, component=comp.name, variant=variant, dtype=dtype, progress=progress)

    meta = {"format": FORMAT, "version": FORMAT_VERSION, "component": "pipeline", "source": str(src.absolute())}
    return write_pipeline(src, out, overwrite, write, meta)


def export_folder(
    src: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False
) -> Path:
    """converted sfv_jax checkpoint (a component or a whole pipeline) -> diffusers / transformers
    folder that ``from_pretrained`` loads."""
    src = Path(src)
    if problem := output_overlaps("--out", out, {"--src": src}):
        raise CheckpointError(problem)
    if not is_converted(src):
        raise CheckpointError(f"{src}: not a converted sfv_jax checkpoint (no {META_FILE})")
    meta = read_meta(src)
    if meta["component"] == "pipeline":
        return write_pipeline(
            src, out, overwrite, lambda comp, dest: export_folder(src / comp.subfolder, dest, dtype=dtype), None
        )
    comp = COMPONENTS[meta["component"]]
    config = read_config(src)
    try:
        abstract = comp.abstract_params(config)
    except ValueError as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from None
    params = load_converted(src, abstract, comp.name)
    return export_diffusers(
        params, config, out, weights_name=f"{comp.weights_stem}.safetensors", dtype=dtype, overwrite=overwrite
    )
