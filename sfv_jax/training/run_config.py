"""A training config's checks: what the trainer refuses before it touches anything, naming the flag."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from sfv_jax.data import clips
from sfv_jax.data.sources import KINDS as DATA_KINDS
from sfv_jax.models.attention import ATTENTION_IMPLS
from sfv_jax.models.build import COMPUTE_DTYPES
from sfv_jax.paths import folder_problem
from sfv_jax.training import losses, objectives, param_groups
from sfv_jax.training import steps as train_steps
from sfv_jax.training.discriminator import COND_EMBEDDINGS, FEATURE_MAPS, HEAD_KINDS

# When opt.nonfinite="halt" looks at the steps' finite flags: at log steps (the host never waits for the
# device in between; a halt then names every non-finite step since the last check) or after every step.
HALT_CHECKS = ("log_steps", "every_step")


class ConfigError(ValueError):
    """A training config the trainer cannot run (the message names the ``--config.`` flag)."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject settings the trainer cannot run, naming the ``--config.`` flag."""

    def need(ok: bool, flag: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--config.{flag}={config_get(config, flag)!r}: {msg}")

    for flag in (
        "total_steps",
        "checkpoint_every_steps",
        "log_every_steps",
        "keep_checkpoints",
        "data.micro_batch",
        "data.accum_steps",
        "data.num_frames",
    ):
        need(config_get(config, flag) >= 1, flag, "must be >= 1")
    need(config.sample_every_steps >= 0, "sample_every_steps", "must be >= 0 (0: no samples)")
    need(config.heldout_every_steps >= 0, "heldout_every_steps", "must be >= 0 (0: no held-out grip)")
    need(config.heldout_steps >= 1, "heldout_steps", "must be >= 1 (steps' worth of fixed clips)")
    need(config.model.dtype in COMPUTE_DTYPES, "model.dtype", f"must be one of {COMPUTE_DTYPES}")
    need(
        config.model.get("attention_impl") in ATTENTION_IMPLS,
        "model.attention_impl",
        f"must be one of {ATTENTION_IMPLS}",
    )
    need(config.data.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}")
    need(config.disc.heads in HEAD_KINDS, "disc.heads", f"must be one of {HEAD_KINDS}")
    need(config.disc.cond_embedding in COND_EMBEDDINGS, "disc.cond_embedding", f"must be one of {COND_EMBEDDINGS}")
    need(config.disc.feature_maps in FEATURE_MAPS, "disc.feature_maps", f"must be one of {FEATURE_MAPS}")
    need(config.loss.r1_type in losses.R1_TYPES, "loss.r1_type", f"must be one of {losses.R1_TYPES}")
    need(
        config.opt.nonfinite in train_steps.NONFINITE_POLICIES,
        "opt.nonfinite",
        f"must be one of {train_steps.NONFINITE_POLICIES}",
    )
    need(config.opt.halt_check in HALT_CHECKS, "opt.halt_check", f"must be one of {HALT_CHECKS}")
    need(config.objective in objectives.OBJECTIVES, "objective", f"must be one of {objectives.OBJECTIVES}")
    need(config.trainable in param_groups.TRAINABLE, "trainable", f"must be one of {param_groups.TRAINABLE}")
    need(
        config.opt.optimizer in (None, *train_steps.OPTIMIZERS),
        "opt.optimizer",
        f"must be one of {train_steps.OPTIMIZERS} or None (the objective's default)",
    )
    need(config.opt.warmup_steps >= 0, "opt.warmup_steps", "must be >= 0")
    # numbers enter from the command line as text: a NaN or an infinity anywhere would train silently wrong
    for flag, value in _flat(config.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--config.{flag}={value!r}: must be a finite number")
    for flag in ("opt.generator_lr", "opt.discriminator_lr", "opt.adamw_eps"):
        need(config_get(config, flag) > 0, flag, "must be > 0")
    for flag in ("opt.b1", "opt.b2", "opt.adamw_b1", "opt.adamw_b2"):
        need(0 <= config_get(config, flag) < 1, flag, "must be in [0, 1) (a decay rate)")
    need(
        0 <= config.opt.ema_rate <= 1,
        "opt.ema_rate",
        "must be in [0, 1] (the EMA keeps this fraction of itself per step; above 1 it extrapolates away)",
    )
    need(config.opt.weight_decay >= 0, "opt.weight_decay", "must be >= 0")
    need(
        isinstance(config.opt.disc_updates, int) and config.opt.disc_updates >= 1,
        "opt.disc_updates",
        "must be a whole number >= 1 (discriminator updates per generator update)",
    )
    need(config.opt.clip_norm is None or config.opt.clip_norm > 0, "opt.clip_norm", "must be > 0 or None (off)")
    need(config.data.noise_aug in clips.NOISE_AUG_KINDS, "data.noise_aug", f"must be one of {clips.NOISE_AUG_KINDS}")
    need(
        config.data.noise_aug == "fixed" or config.data.kind != "latents",
        "data.noise_aug",
        "pre-encoded latents hold a fixed augmentation; per-sample strengths need on-the-fly encoding",
    )
    diff = config.diffusion
    need(diff.p_std > 0, "diffusion.p_std", "must be > 0")
    for name in ("drop_embed", "drop_both", "drop_latent"):
        need(0 <= diff[name] <= 1, f"diffusion.{name}", "must be a probability in [0, 1]")
    need(
        diff.drop_embed + diff.drop_both + diff.drop_latent <= 1,
        "diffusion.drop_latent",
        "drop_embed + drop_both + drop_latent must be <= 1 (they are exclusive outcomes of one draw)",
    )
    need(
        config.loss.sigma_max_prob is None or 0 <= config.loss.sigma_max_prob <= 1,
        "loss.sigma_max_prob",
        "must be a probability in [0, 1] or None (uniform over the generator's levels)",
    )
    need(config.loss.distill_weight >= 0, "loss.distill_weight", "must be >= 0 (0: no distillation term)")
    need(
        config.objective != "guidance" or bool(config.init_from),
        "init_from",
        "the guidance objective distils a trained generator: name its pipeline folder",
    )
    if config.objective in ("sfv", "guidance"):
        need(
            1 <= config.sample.steps < config.loss.generator_grid,
            "sample.steps",
            f"the SF-V sampler takes 1 to T_g - 1 = {config.loss.generator_grid - 1} steps (its trained levels)",
        )


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar leaves as ``{"loss.r1_gamma": 1e-05, ...}`` (model dicts and None left out)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                if not prefix.startswith("model"):
                    walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[prefix + k] = v

    walk(config.to_dict(), "")
    return out


# What a rerun on a workdir that has checkpoints may change (prefixes of dotted keys): run length,
# logging / checkpoint / sample cadence and their look, loader threads, the non-finite policy, and the
# mesh (a checkpoint restores onto any mesh). Anything else changes shapes or semantics and is refused.
RESUME_SAFE = (
    "total_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "sample_every_steps",
    "heldout_every_steps",
    "heldout_steps",
    "sample.",
    "mesh.",
    "data.workers",
    "data.prefetch",
    "opt.nonfinite",
    "opt.halt_check",
    "checkpoint_fallback",
)

# Settings added after runs were already being made, each with the value that means what their absence
# meant: a workdir whose config.json predates one resumes when the new config keeps that value.
ADDED_SETTINGS = {
    "loss.sigma_max_prob": None,
    "disc.spectral_norm": False,
    "opt.disc_updates": 1,
    "disc.feature_maps": "blocks",
    "loss.distill_weight": 0.0,
    "loss.distill_min_guidance": 1.0,
    "loss.distill_max_guidance": 3.0,
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``key: saved -> new`` for every key outside :data:`RESUME_SAFE` where ``config`` differs from the
    run's saved ``config.json`` (a dict), sorted."""
    old = {**ADDED_SETTINGS, **_flat(saved)}
    new = _flat(json.loads(config.to_json_best_effort()))
    keys = sorted(set(old) | set(new))
    missing = object()
    return [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in keys
        if not k.startswith(RESUME_SAFE) and old.get(k, missing) != new.get(k, missing)
    ]


def saved_conflicts(workdir: Path, config: ml_collections.ConfigDict, also: tuple[str, ...] = ()) -> list[str]:
    """:func:`resume_conflicts` of the run's saved ``workdir/config.json`` against ``config``, plus the
    top-level keys ``also`` even where resume-safe; an unreadable file is a ConfigError naming it."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--workdir {workdir}: its config.json cannot be read ({e})") from None
    extra = [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in also if saved.get(k) != config.get(k)]
    return resume_conflicts(saved, config) + extra


def _has_checkpoints(workdir: Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuse, before anything is written, a ``--workdir`` that is not a usable folder, or one whose
    checkpoints were made with a config that differs from ``config`` outside ``RESUME_SAFE`` (each
    differing key listed)."""
    if problem := folder_problem("--workdir", workdir):
        raise ConfigError(problem)
    folder = workdir / "checkpoints"
    links = [folder] if folder.is_symlink() else []
    links += [p for p in folder.iterdir() if p.is_symlink()] if folder.is_dir() and not links else []
    if links:
        raise ConfigError(
            f"--workdir {workdir}: {links[0]} is a symbolic link; the run writes and deletes the checkpoints "
            "there itself (older ones are removed as it goes), so it holds only its own folders: move the link out"
        )
    if not ((workdir / "config.json").is_file() and _has_checkpoints(workdir)):
        return
    if conflicts := saved_conflicts(workdir, config):
        raise ConfigError(
            f"--workdir {workdir}: its checkpoints were made with another config; resuming would change "
            f"{len(conflicts)} setting(s) that change shapes or meaning (nothing was written; use a new "
            f"--workdir, or change only {', '.join(RESUME_SAFE)}):\n  " + "\n  ".join(conflicts)
        )
