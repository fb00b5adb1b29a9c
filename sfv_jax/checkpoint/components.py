"""The one registry of SVD's convertible components and the folder layout both the converter and the
loader read: diffusers / transformers component folders (``config.json`` + safetensors), whole pipeline
folders (``model_index.json`` + ``unet/``, ``vae/``, ``image_encoder/``) and converted sfv_jax
checkpoints (``sfv_jax.json`` + ``config.json`` + ``params/``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.models import build

FORMAT = "sfv_jax-orbax"
FORMAT_VERSION = 1
META_FILE = "sfv_jax.json"


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json (a diffusers component folder or a converted sfv_jax checkpoint needs one)"
        )
    return read_json_object(cfg_path)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; a file that is not JSON, or holds another kind of value, is a
    CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def is_converted(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


def read_meta(folder: Path, component: str | None = None) -> dict:
    """The ``sfv_jax.json`` of a converted folder, checked: a JSON object of this format and version, a
    known component (``component``, when given, must match), and for a model component its ``params/``
    present and its ``config.json`` of the same class. Anything else is a CheckpointError naming the file."""
    path = Path(folder) / META_FILE
    try:
        meta = read_json_object(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the converted folder is damaged: convert again") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {meta.get('format')!r} v{meta.get('version')} "
            f"(this sfv_jax reads {FORMAT} v{FORMAT_VERSION})"
        )
    kind = meta.get("component")
    if kind not in (*COMPONENTS, "pipeline"):
        raise CheckpointError(f"{path}: component {kind!r} is not one of {[*COMPONENTS, 'pipeline']}")
    if component is not None and kind != component:
        raise CheckpointError(f"{path}: holds component {kind!r}, but it is read as the {component}")
    if kind != "pipeline":
        if not (path.parent / "params").is_dir():
            raise CheckpointError(
                f"{path.parent}: no params/ (the converted weights): the folder is incomplete; convert again"
            )
        config = read_config(path.parent)
        names = [config.get("_class_name"), *list(config.get("architectures") or [])]
        if COMPONENTS[kind].class_name not in names:
            raise CheckpointError(
                f"{path}: says component {kind!r}, but {path.parent / 'config.json'} describes "
                f"{[n for n in names if n]} (a {kind} is a {COMPONENTS[kind].class_name}); the folder is damaged: "
                "convert again"
            )
    return meta


@dataclasses.dataclass(frozen=True)
class Component:
    """How to build, and where to find, one convertible model."""

    name: str
    subfolder: str
    weights_stem: str
    class_name: str  # diffusers ``_class_name`` / transformers ``architectures`` entry
    build: Callable[..., Any]  # config dict (+ dtype= ...) -> the Flax module

    def abstract_params(self, config: Mapping) -> Mapping:
        """The unboxed abstract parameters (``jax.eval_shape``) of the module ``config`` describes."""
        return build.abstract_params(self.build(config))


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            "unet", "unet", "diffusion_pytorch_model", "UNetSpatioTemporalConditionModel", build.unet_from_config
        ),
        Component("vae", "vae", "diffusion_pytorch_model", "AutoencoderKLTemporalDecoder", build.vae_from_config),
        Component(
            "image_encoder", "image_encoder", "model", "CLIPVisionModelWithProjection", build.image_encoder_from_config
        ),
    )
}
PIPELINE_INDEX = "model_index.json"
# the model_index.json of a pipeline folder this project writes itself (export of a random-init run, the toy world)
PIPELINE_CLASSES = {
    "_class_name": "StableVideoDiffusionPipeline",
    "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
    "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
}
# Sub-folders of a diffusers SVD folder that hold only configs; copied as they are.
CONFIG_ONLY = ("feature_extractor", "scheduler")


def component_folder(path: Path, comp: Component) -> Path:
    """``path`` itself, or its ``comp.subfolder`` when ``path`` is a whole pipeline folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        if (path / comp.subfolder).is_dir():
            return path / comp.subfolder
        if is_pipeline_folder(path):
            raise CheckpointError(f"{path}: the pipeline folder has no {comp.subfolder}/ (the {comp.name} component)")
    return path


def detect_component(config: Mapping, where: Path) -> str:
    """The component name for a config dict, from its ``_class_name`` or ``architectures``."""
    names = [config.get("_class_name")] + list(config.get("architectures") or [])
    for key, comp in COMPONENTS.items():
        if comp.class_name in names:
            return key
    known = ", ".join(c.class_name for c in COMPONENTS.values())
    raise CheckpointError(f"{where}/config.json: class {[n for n in names if n]} is not an SVD component ({known})")


def is_pipeline_folder(path: Path) -> bool:
    if (path / PIPELINE_INDEX).is_file():
        return True
    if is_converted(path):
        return read_meta(path)["component"] == "pipeline"
    return False


def read_pipeline_index(root: Path) -> dict | None:
    """A pipeline folder's ``model_index.json`` (None if it has none), checked to be a JSON object."""
    path = root / PIPELINE_INDEX
    return read_json_object(path) if path.is_file() else None


def check_pipeline_folder(root: Path) -> None:
    """Raise a CheckpointError unless ``root`` is a (diffusers or converted) SVD pipeline folder with
    every model component."""
    if not root.exists():
        raise CheckpointError(f"{root}: does not exist")
    if not root.is_dir() or not is_pipeline_folder(root):
        raise CheckpointError(
            f"{root}: not an SVD pipeline folder (expected {PIPELINE_INDEX} with unet/, vae/ "
            "and image_encoder/ sub-folders, or a folder converted from one)"
        )
    read_pipeline_index(root)
    missing = [f"{c.subfolder}/" for c in COMPONENTS.values() if not (root / c.subfolder / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"{root}: the pipeline folder is missing {', '.join(missing)} (each needs config.json and its weights)"
        )
