"""The discriminator's grip on fixed clips, every ``heldout_every_steps`` (docs/training.md, "The
GAN's health"): how far, per generator level and head kind, the heads still tell the generator's one-step
videos from real ones on clips that do not change during the run.

The training log's per-level margin and pair rank (``losses.level_statistics``) come from the batch just
trained on, a few samples per level and step, and the heads have just been fitted to it. Here the clips, the
generator levels, sigma' and the noise are the same at every evaluation (all drawn from fixed keys), so a
margin that shrinks to 0 means the generator caught up, one that stays high means the heads see something
the generator does not fix, and a pair rank below 0.5 at a level means the heads call its fakes more real
than real (over-sharpened output). For synthetic and toy data the clips are ones the run never trains on
(a position far past any run's); for a video folder they are fixed clips of the dataset.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfv_jax.data.loader import Loader
from sfv_jax.diffusion import edm
from sfv_jax.training import losses, objectives
from sfv_jax.training import steps as train_steps
from sfv_jax.training.discriminator import discriminator_logits

HELD_OUT_POSITION = 1 << 30  # the fixed clips' data position (synthetic / toy data: never reached by training)
HELD_OUT_KEY = 20231  # sigma', eps and eps_g of the fixed clips: fold_in(PRNGKey(HELD_OUT_KEY), sample index)


def grip(
    head_params: Any,
    micro: dict,
    gen_params: Any,
    backbone: Any,
    key: jax.Array,
    *,
    models: objectives.Models,
    cfg: objectives.StepConfig,
) -> dict[str, jax.Array]:
    """Every clip of ``micro`` against its one-step fake from each generator level of the grid in turn (the
    same eps_g at every level), real and fake sharing sigma' and eps (Fig. 2), all from ``fold_in(key,
    index)``. Returns ``losses.level_statistics``' sums and counts (``losses.reduce_interval`` makes them
    ``d_margin_<kind>@<level>`` and ``d_rank_<kind>@<level>``). ``gen_params``: the full UNet tree."""
    x0 = micro["latents"].astype(jnp.float32)
    n = objectives.sample_noise(key, micro["index"], x0.shape[1:], cfg)
    cond = objectives.conditioning(micro)
    levels = edm.generator_sigma_levels(cfg.generator_grid)
    s_d = n["sigma_d"][:, None, None, None, None]

    def d(x):
        return discriminator_logits(models.unet, backbone, models.heads, head_params, x, n["sigma_d"], cond)

    real_logits = d(x0 + s_d * n["eps_d"])
    kinds = models.heads.logit_kinds(len(real_logits))

    def level_stats(i):  # one generator and one discriminator in the program, whatever the number of levels
        s_g = jnp.full(x0.shape[:1], jnp.asarray(levels, jnp.float32)[i])
        x_t = x0 + s_g[:, None, None, None, None] * n["eps_g"]
        x0_hat = objectives.generate(models.unet, gen_params, x_t, s_g, cond)
        level = jnp.full(x0.shape[:1], i, jnp.int32)
        return losses.level_statistics(real_logits, d(x0_hat + s_d * n["eps_d"]), kinds, level, levels)

    per_level = jax.lax.map(level_stats, jnp.arange(len(levels)))  # T_g - 1 levels (3 for the paper's T_g = 4)
    return jax.tree.map(lambda v: jnp.sum(v, axis=0), per_level)


def batch_grip(head_params, batch: dict, gen_params, backbone, key, *, models, cfg) -> dict[str, jax.Array]:
    """:func:`grip` of a ``[k, m, ...]`` batch, one micro-batch at a time (the memory of one), sums added."""
    per_micro = jax.lax.map(
        lambda micro: grip(head_params, micro, gen_params, backbone, key, models=models, cfg=cfg), batch
    )
    return jax.tree.map(lambda v: jnp.sum(v, axis=0), per_micro)


def grip_program(steps: train_steps.JittedSteps, plan) -> Callable:
    """The jitted :func:`batch_grip` of a run's steps: ``(heads, batch, unet_params, backbone, key) ->``
    replicated sums; one definition for the trainer and the memory planner."""
    return jax.jit(functools.partial(batch_grip, models=steps.models, cfg=steps.cfg), out_shardings=plan.replicated)


def abstract_call(steps: train_steps.JittedSteps, plan, state, batch, backbone, heldout_steps: int) -> tuple:
    """(the grip program, its abstract arguments) for abstract ``state`` / ``batch`` / ``backbone`` of a run
    whose fixed clips are ``heldout_steps`` steps' samples: compiled without running, as the planner does."""
    clips = {
        k: jax.ShapeDtypeStruct((heldout_steps * a.shape[0], *a.shape[1:]), a.dtype, sharding=a.sharding)
        for k, a in batch.items()
    }
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=plan.replicated)
    return grip_program(steps, plan), (state.heads, clips, state.unet_params(), backbone, key)


class HeldOutGrip:
    """``grip(state, step)``: :func:`batch_grip` of the current generator and heads on the fixed clips
    (``config.heldout_steps`` steps' samples from ``HELD_OUT_POSITION`` on, this process's rows of them), written as
    ``heldout/d_margin_<kind>@<level>`` / ``heldout/d_rank_<kind>@<level>`` and logged in one line.
    Sharded like the training step."""

    def __init__(self, config, plan, lay, steps: train_steps.JittedSteps, encoder, backbone: Any, writer):
        self.plan, self.backbone, self.writer = plan, backbone, writer
        loader = Loader(config, encoder, global_micro=lay.global_micro, rows=plan.local_rows(lay.global_micro))
        steps_of_clips = [loader.batch(HELD_OUT_POSITION + i * loader.per_step) for i in range(config.heldout_steps)]
        local = {k: np.concatenate([b[k] for b in steps_of_clips]) for k in steps_of_clips[0]}  # [steps * k, R, ...]
        self.batch = plan.global_batch(local, lay.global_micro)
        self.clips = config.heldout_steps * loader.per_step
        self.key = jax.random.PRNGKey(HELD_OUT_KEY)
        self.fn = grip_program(steps, plan)

    def __call__(self, state: train_steps.TrainState, step: int) -> dict[str, float]:
        with self.plan.context():
            sums = self.fn(state.heads, self.batch, state.unet_params(), self.backbone, self.key)
        out = {f"heldout/{k}": v for k, v in losses.reduce_interval([jax.device_get(sums)]).items()}
        self.writer.write_scalars(step, out)
        logging.info(
            "held-out grip at step %d (%d clips): %s",
            step,
            self.clips,
            "  ".join(f"{k.removeprefix('heldout/')} {v:.3g}" for k, v in sorted(out.items())),
        )
        return out
