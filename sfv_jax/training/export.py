"""A trained run (SF-V or diffusion) -> an SVD pipeline folder that ``sample``, ``load_pipeline`` and ``convert
--to-diffusers`` use like any converted SVD checkpoint.

    python -m sfv_jax.cli.export --workdir runs/sfv_svd --out checkpoints/sfv                 # EMA, latest step
    python -m sfv_jax.cli.export --workdir runs/sfv_svd --out checkpoints/sfv_5k --step 5000 --weights generator
    python -m sfv_jax.cli.sample --model checkpoints/sfv --image cat.png --out cat.mp4        # one step

The UNet is the run's EMA generator (``--weights ema``, the paper's) or its raw generator weights; the
VAE and image encoder are those the run was trained with: copied from ``init_from`` (converted first if
it is a diffusers folder), or, for a randomly initialised run, re-created from its config and seed.
``dtype`` (``--dtype bfloat16``): every component's parameters are stored in that dtype (half the folder;
the loaders cast to their ``param_dtype``); by default each is written as it is. The output is staged and
renamed into place: an interrupted export leaves nothing at ``--out``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import ml_collections

from sfv_jax.checkpoint import components, convert, pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.models.build import DTYPES
from sfv_jax.parallel import sharding
from sfv_jax.paths import output_overlaps
from sfv_jax.training.checkpoints import checkpoint_manager, restore
from sfv_jax.training.layout import build_modules, init_params, make_layout
from sfv_jax.training.run_config import ConfigError, check_config

WEIGHTS = ("ema", "generator")


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """A training workdir's ``config.json``, checked as the trainer checks a config (a damaged or foreign
    file is a CheckpointError naming it, not a traceback in the middle of an export)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a training workdir of sfv_jax.cli.train?)")
    config = ml_collections.ConfigDict(components.read_json_object(path))
    try:
        check_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a training config of sfv-train (missing or wrong key: {e})") from None
    return config


def _component_config(config: ml_collections.ConfigDict, name: str) -> dict:
    if config.init_from:
        comp = components.COMPONENTS[name]
        return components.read_config(components.component_folder(Path(config.init_from), comp))
    return config.model[name].to_dict()


def trained_unet(
    workdir: str | Path,
    *,
    weights: str = "ema",
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> tuple[dict, dict, int]:
    """(UNet config dict, trained UNet params, step) of a training workdir's checkpoint (``config``:
    the run's config, read from the workdir when not given)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: must be one of {WEIGHTS}")
    config = run_config(workdir) if config is None else config
    unet_cfg = _component_config(config, "unet")
    plan = sharding.Plan(sharding.make_mesh({}, jax.local_devices()[:1]))  # any mesh restores onto one device
    like = make_layout(config, plan, *build_modules(config)).abstract_state
    mngr = checkpoint_manager(workdir)
    state, meta = restore(mngr, like, step)
    return unet_cfg, state.unet_params(weights), int(meta["step"])  # frozen parameters included


def export_run(
    workdir: str | Path,
    out: str | Path,
    *,
    weights: str = "ema",
    step: int | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write the pipeline folder; returns its path. ``dtype``: a key of ``models.build.DTYPES`` or None."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    store = None if dtype is None else DTYPES[dtype]
    workdir = Path(workdir)
    config = run_config(workdir)
    if problem := output_overlaps("--out", out, {"--workdir": workdir, "the run's init_from": config.init_from}):
        raise CheckpointError(problem)
    unet_cfg, params, step = trained_unet(workdir, weights=weights, step=step, config=config)
    meta = {
        "format": components.FORMAT,
        "version": components.FORMAT_VERSION,
        "component": "pipeline",
        "source": str(workdir.absolute()),
        "trained_step": step,
        "weights": weights,
    }
    src = Path(config.init_from) if config.init_from else None

    def write(comp: components.Component, dest: Path) -> None:
        if comp.name == "unet":
            source = f"{workdir.absolute()} step {step} {weights}"
            convert.save_converted(dest, params, unet_cfg, "unet", source=source, dtype=store)
        elif not components.is_converted(src / comp.subfolder):
            kw = {} if store is None else {"dtype": store}
            convert.convert_folder(src / comp.subfolder, dest, component=comp.name, progress=False, **kw)
        elif store is None:
            shutil.copytree(src / comp.subfolder, dest)
        else:
            _, comp_params = pretrained.load(comp.name, src, progress=False)
            cfg = components.read_config(src / comp.subfolder)
            source = f"{src / comp.subfolder} as {dtype}"
            convert.save_converted(dest, comp_params, cfg, comp.name, source=source, dtype=store)

    if src is not None:
        return convert.write_pipeline(src, Path(out), overwrite, write, meta)
    # random-init run: the VAE and image encoder are re-created from the run's config and seed
    plan = sharding.Plan(sharding.make_mesh({}, jax.local_devices()[:1]))
    _, vae_params, clip_params, _, _ = init_params(
        config, make_layout(config, plan, *build_modules(config)), jax.random.PRNGKey(config.seed)
    )
    parts = {
        "unet": (params, unet_cfg, f"{workdir.absolute()} step {step}"),
        "vae": (vae_params, config.model.vae.to_dict(), "random init"),
        "image_encoder": (clip_params, config.model.image_encoder.to_dict(), "random init"),
    }
    return convert.save_converted_pipeline(out, parts, meta, overwrite=overwrite, dtype=store)
