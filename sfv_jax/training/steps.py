"""The training steps as pure functions: jit them with the static ``Models`` / ``StepConfig`` bound and
the state donated. Each objective (``StepConfig.objective``, ``config.objective``; its losses in
``sfv_jax.training.objectives``) shares everything here:

  ``sfv``        SF-V's alternating generator and discriminator steps (paper Sec. 3.2, Fig. 2)
  ``diffusion``  SVD's own EDM denoising loss (one step per iteration, no discriminator): fine-tuning
                 SVD, and training the teacher SF-V distils
  ``guidance``   guidance distillation of a trained generator (one step per iteration, no discriminator)

The generator (the UNet) trains only its ``trainable`` leaves (``sfv_jax.training.param_groups``); the
rest sit in ``TrainState.frozen`` (no gradient, no optimizer state, no EMA).

A batch is a dict of arrays with a leading micro-batch axis ``k`` (gradient accumulation):
  ``latents``        [k, m, F, h, w, 4]  real video latents x0 (scaled by the VAE scaling factor)
  ``image_latents``  [k, m, h, w, 4]     conditioning frame, VAE posterior mean (unscaled, noise-augmented)
  ``image_embeds``   [k, m, D]           CLIP image embedding
  ``added_time_ids`` [k, m, 3]           [fps - 1, motion_bucket_id, noise_aug_strength]
  ``index``          [k, m] int32        the samples' global indices
Per-sample noise (sigma, sigma', eps, the conditioning dropout) comes from ``fold_in(step key, index)``,
so splitting a batch into micro-batches, devices or hosts never changes a sample's draw: k accumulated
micro-batches equal one step on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from sfv_jax import programs
from sfv_jax.training import losses, param_groups
from sfv_jax.training.objectives import GENERATOR_LOSS, Models, StepConfig, discriminator_loss_fn

NONFINITE_POLICIES = ("skip", "halt")
OPTIMIZERS = ("sm3", "adamw")
# config opt.optimizer = None: the objective's
DEFAULT_OPTIMIZER = {"sfv": "sm3", "diffusion": "adamw", "guidance": "adamw"}


@flax.struct.dataclass
class TrainState:
    """Everything a step changes (and a checkpoint holds, with the data position)."""

    step: jax.Array  # int32, completed iterations (sfv: one G step + one D step; diffusion: one step)
    generator: Any  # the UNet's trained parameters (all of them, or the ``trainable`` subset)
    ema: Any  # EMA of the generator
    heads: Any  # discriminator head parameters ({} for the diffusion objective)
    gen_opt: Any
    disc_opt: Any
    rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step)
    skipped: jax.Array  # int32, updates skipped because of a non-finite loss or gradient
    frozen: Any = dataclasses.field(default_factory=dict)  # the UNet's frozen parameters ({}: none)

    def unet_params(self, which: str = "generator") -> Any:
        """The full UNet parameter tree: the ``generator`` (or ``ema``) leaves and the frozen ones."""
        return param_groups.merge(getattr(self, which), self.frozen)


def make_optimizer(learning_rate: float, b1: float = 0.5, b2: float = 0.999) -> optax.GradientTransformation:
    """SM3 with momentum ``b1`` and second-moment decay ``b2`` (paper Sec. 4: 0.5 / 0.999). ``optax.sm3``
    fixes b2 = 1, hence the chain (docs/method.md, "Optimizer, EMA and steps")."""
    return optax.chain(optax.scale_by_sm3(b1=b1, b2=b2), optax.scale_by_learning_rate(learning_rate))


def init_state(
    generator_params: Any,
    head_params: Any,
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    rng: jax.Array,
    frozen: Any = None,
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        generator=generator_params,
        ema=jax.tree.map(jnp.copy, generator_params),
        heads=head_params,
        gen_opt=gen_tx.init(generator_params),
        disc_opt=disc_tx.init(head_params),
        rng=rng,
        skipped=jnp.zeros((), jnp.int32),
        frozen={} if frozen is None else frozen,
    )


# ----------------------------------------------------------------------------- accumulation and updates


def accumulate_grads(loss_fn, params, batch: dict, *args) -> tuple[Any, dict]:
    """Mean gradient and metrics of ``loss_fn(params, micro, *args)`` over the k micro-batches (lax.scan:
    the gradient is summed in the carry, the metrics come out stacked [k] and are averaged, sums and counts
    added);
    ``args`` are arrays / pytrees (bind static settings with functools.partial). The loss function is
    traced once (no ``eval_shape`` of it for the carry: tracing the tiny UNet's step costs seconds)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    k = batch["index"].shape[0]
    if k == 1:  # no loop: XLA:CPU runs a while-loop body ~4x slower (the toy UNet's gradient: 2.14 s vs 0.51 s)
        g, metrics = grad_fn(params, jax.tree.map(lambda x: x[0], batch), *args)
        return g, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    def body(acc, micro):
        g, metrics = grad_fn(params, micro, *args)
        return jax.tree.map(jnp.add, acc, g), metrics

    zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    g, metrics = jax.lax.scan(body, zero_g, batch)

    def reduce(name, m):  # sums and counts (losses.level_statistics) add up over the micro-batches
        total = jnp.sum(m.astype(jnp.float32), axis=0)
        return total if name.startswith((losses.SUM_PREFIX, losses.COUNT_PREFIX)) else total / k

    return jax.tree.map(lambda x: x / k, g), {name: reduce(name, m) for name, m in metrics.items()}


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def ema_update(ema: Any, params: Any, rate: float) -> Any:
    """ema <- rate * ema + (1 - rate) * params (paper Sec. 4: rate 0.95)."""
    return jax.tree.map(
        lambda e, p: (rate * e.astype(jnp.float32) + (1.0 - rate) * p.astype(jnp.float32)).astype(e.dtype), ema, params
    )


def _apply(tx, grads, opt_state, params, loss, extra=None):
    """The optimizer update, applied only if the loss and every gradient are finite: a single
    ``lax.cond`` (a per-leaf ``where`` on one predicate makes XLA:CPU's fusion passes take minutes).
    ``extra(new_params) -> pytree`` computes more outputs of the finite branch (the EMA); in the other
    branch they are ``None`` placeholders filled by the caller's old values."""
    finite = jnp.isfinite(loss) & _all_finite(grads)

    def update(_):
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return new_params, new_opt, (extra(new_params) if extra else None)

    def keep(_):
        return params, opt_state, (extra(params, keep=True) if extra else None)

    new_params, new_opt, more = jax.lax.cond(finite, update, keep, None)
    return finite, new_params, new_opt, optax.tree.norm(grads), more


def _step_key(state: TrainState, which: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), which)


def generator_grads(
    state: TrainState, batch: dict, backbone: Any, *, models: Models, cfg: StepConfig
) -> tuple[Any, dict]:
    """Mean gradient of the objective's generator loss over the micro-batches (the UNet's trained
    parameters only; frozen parameters, heads and backbone are inputs)."""
    loss_fn = functools.partial(GENERATOR_LOSS[cfg.objective], models=models, cfg=cfg)
    return accumulate_grads(loss_fn, state.generator, batch, state.frozen, backbone, state.heads, _step_key(state, 0))


def generator_update(
    state: TrainState, grads: Any, metrics: dict, *, cfg: StepConfig, tx: optax.GradientTransformation
) -> tuple[TrainState, dict]:
    """Optimizer update of the generator and its EMA. A non-finite loss or gradient leaves the state
    unchanged (``g_finite`` = 0, ``skipped`` + 1). Without a discriminator step (the diffusion and guidance
    objectives) the iteration counter advances here."""

    def ema(new_params, keep=False):
        return state.ema if keep else ema_update(state.ema, new_params, cfg.ema_rate)

    finite, params, opt, gnorm, ema = _apply(tx, grads, state.gen_opt, state.generator, metrics["g_loss"], ema)
    state = state.replace(
        generator=params,
        gen_opt=opt,
        ema=ema,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        step=state.step if cfg.has_discriminator else state.step + 1,
    )
    return state, {**metrics, "g_grad_norm": gnorm, "g_finite": finite.astype(jnp.float32)}


DISC_SUBSTEP_STREAM = 1000  # the key of discriminator update j > 0 of one iteration: fold_in(step key, 1000 + j)


def discriminator_grads(
    state: TrainState, batch: dict, backbone: Any, substep: jax.Array, *, models: Models, cfg: StepConfig
) -> tuple[Any, dict]:
    """Mean discriminator gradient over the micro-batches (head parameters only). ``substep`` (int32 scalar)
    numbers the discriminator updates of one iteration (``StepConfig.disc_updates``): update 0 draws from the
    iteration's discriminator key, update j > 0 from its own, over the same batch (fresh generator levels,
    sigma', noise)."""
    loss_fn = functools.partial(discriminator_loss_fn, models=models, cfg=cfg)
    which = jnp.where(substep == 0, 1, DISC_SUBSTEP_STREAM + substep)
    return accumulate_grads(loss_fn, state.heads, batch, state.unet_params(), backbone, _step_key(state, which))


def discriminator_update(
    state: TrainState, grads: Any, metrics: dict, last: jax.Array, *, tx: optax.GradientTransformation
) -> tuple[TrainState, dict]:
    """Optimizer update of the heads; after the iteration's ``last`` (bool scalar) discriminator update the
    iteration counter advances."""
    finite, heads, opt, gnorm, _ = _apply(tx, grads, state.disc_opt, state.heads, metrics["d_loss"])
    state = state.replace(
        heads=heads,
        disc_opt=opt,
        step=state.step + last.astype(jnp.int32),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return state, {**metrics, "d_grad_norm": gnorm, "d_finite": finite.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the steps' inputs and outputs live (``sfv_jax.parallel.sharding.Plan`` computes them): ``state`` a
    ``TrainState`` of shardings, ``backbone`` the frozen encoder's, ``batch`` one sharding for every
    batch array (samples split over the mesh's batch axes), ``replicated`` for metrics."""

    state: Any
    backbone: Any
    batch: Any
    replicated: Any


@dataclasses.dataclass
class JittedSteps:
    """The generator step and the discriminator step, each as two jitted functions: gradients (the
    accumulation loop; ``g_grads`` / ``d_grads``), then the update with the state buffers donated
    (``g_update`` / ``d_update``). The diffusion objective has no discriminator step (``d_grads`` and
    ``d_update`` are None; :meth:`step` runs what the objective has). (One jit with both the accumulation
    loop and donated outputs makes XLA:CPU's copy insertion take minutes to compile.)

    With ``shardings`` the jits get explicit in/out shardings (gradients come out sharded like the
    parameters, metrics replicated) and the calls run inside ``context()`` (the mesh and logical-axis
    rules of ``sfv_jax.parallel.sharding.Plan.context``, so the UNet's activation constraints apply)."""

    models: Models
    cfg: StepConfig
    gen_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    shardings: StepShardings | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # what ``context`` sets that the traces depend on (a Plan's mesh and logical-axis rules); by default
    # the context itself, so that steps built with different contexts never share programs
    context_key: Hashable | None = None

    def __post_init__(self):
        # equal models, settings, optimizers and shardings give the same jitted objects within a process
        # (sfv_jax.programs): a second run finds its steps in jit's cache, traced and loaded
        sh = self.shardings
        key = (
            "steps",
            self.models,
            self.cfg,
            self.gen_tx,
            self.disc_tx,
            None if sh is None else programs.shardings_key((sh.state, sh.backbone, sh.batch, sh.replicated)),
            self.context if self.context_key is None else self.context_key,
        )
        self.g_grads, self.g_update, self.d_grads, self.d_update = programs.jitted(key, self._jit)
        if not self.cfg.has_discriminator:
            self.d_grads = self.d_update = None

    def _jit(self) -> tuple[Callable, Callable, Callable, Callable]:
        """(g_grads, g_update, d_grads, d_update) jitted, with the shardings where there are some."""
        kw = dict(models=self.models, cfg=self.cfg)
        g_grads = functools.partial(generator_grads, **kw)
        g_update = functools.partial(generator_update, cfg=self.cfg, tx=self.gen_tx)
        d_grads = functools.partial(discriminator_grads, **kw)
        d_update = functools.partial(discriminator_update, tx=self.disc_tx)
        sh = self.shardings
        if sh is None:
            return (
                jax.jit(g_grads),
                jax.jit(g_update, donate_argnums=0),
                jax.jit(d_grads),
                jax.jit(d_update, donate_argnums=0),
            )
        st, rep = sh.state, sh.replicated
        return (
            jax.jit(g_grads, in_shardings=(st, sh.batch, sh.backbone), out_shardings=(st.generator, rep)),
            jax.jit(g_update, in_shardings=(st, st.generator, rep), out_shardings=(st, rep), donate_argnums=0),
            jax.jit(d_grads, in_shardings=(st, sh.batch, sh.backbone, rep), out_shardings=(st.heads, rep)),
            jax.jit(d_update, in_shardings=(st, st.heads, rep, rep), out_shardings=(st, rep), donate_argnums=0),
        )

    def generator_step(self, state: TrainState, batch: dict, backbone: Any) -> tuple[TrainState, dict]:
        with self.context():
            return self.g_update(state, *self.g_grads(state, batch, backbone))

    def discriminator_step(
        self, state: TrainState, batch: dict, backbone: Any, substep: int = 0, last: bool = True
    ) -> tuple[TrainState, dict]:
        """Discriminator update ``substep`` of the iteration; the ``last`` one advances the iteration."""
        with self.context():
            grads, metrics = self.d_grads(state, batch, backbone, *self.substep_args(substep))
            return self.d_update(state, grads, metrics, *self.last_args(last))

    @staticmethod
    def substep_args(substep: int = 0) -> tuple[jax.Array]:
        """``d_grads``'s last argument: the update's number within the iteration."""
        return (jnp.int32(substep),)

    @staticmethod
    def last_args(last: bool = True) -> tuple[jax.Array]:
        """``d_update``'s last argument: whether the iteration ends with this update."""
        return (jnp.bool_(last),)

    def abstract(self, args: tuple) -> tuple:
        """Scalar arguments (``substep_args()``, ``last_args()``) as ``jax.ShapeDtypeStruct``s, replicated
        where the steps have shardings: a compile for a target must not carry arrays of this host's
        devices (their memory kind is not the target's)."""
        rep = None if self.shardings is None else self.shardings.replicated
        return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args)

    def abstract_calls(self, state: Any, batch: Any, backbone: Any) -> dict[str, tuple[Callable, tuple]]:
        """``{name: (jitted step, its arguments)}`` for every step program of the objective (``g_grads``,
        ``g_update``, then SF-V's ``d_grads``, ``d_update``), from ``state``, ``batch``, ``backbone`` (arrays
        or ``jax.ShapeDtypeStruct``s with the steps' shardings): the gradients and scalars the updates take
        are abstract, so the programs can be compiled, for this host or a target, without running any."""
        substep, last = self.abstract(self.substep_args()), self.abstract(self.last_args())  # outside a target's mesh
        with self.context():
            g_grads = jax.eval_shape(self.g_grads, state, batch, backbone)
            calls = {
                "g_grads": (self.g_grads, (state, batch, backbone)),
                "g_update": (self.g_update, (state, *self.update_args(g_grads, "generator"))),
            }
            if self.d_grads is not None:
                d_args = (state, batch, backbone, *substep)
                d_grads = jax.eval_shape(self.d_grads, *d_args)
                calls["d_grads"] = (self.d_grads, d_args)
                calls["d_update"] = (self.d_update, (state, *self.update_args(d_grads, "heads"), *last))
        return calls

    def compile(self, state: Any, batch: Any, backbone: Any) -> None:
        """Compile every step program for these arguments (:meth:`abstract_calls`) without running anything;
        the calls then find them in jit's cache. A multi-process run compiles first and meets at a barrier,
        so that no process waits in a collective while another is still compiling."""
        calls = self.abstract_calls(state, batch, backbone)
        with self.context():
            for fn, args in calls.values():
                fn.lower(*args).compile()

    def update_args(self, grads_and_metrics: tuple, field: str) -> tuple:
        """Abstract (gradients, metrics) with the shardings the update step takes them in."""
        grads, metrics = grads_and_metrics
        if self.shardings is None:
            return grads, metrics
        sh = self.shardings

        def put(a, s):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

        grads = jax.tree.map(put, grads, getattr(sh.state, field))
        return grads, jax.tree.map(lambda a: put(a, sh.replicated), metrics)

    def step(self, state: TrainState, batch: dict, backbone: Any) -> tuple[TrainState, dict]:
        """One training iteration of the objective: the generator step, then (sfv) ``cfg.disc_updates``
        discriminator steps on the same batch. Returns the new state and the device metrics of the generator
        step and of the last discriminator step."""
        state, metrics = self.generator_step(state, batch, backbone)
        if self.d_grads is not None:
            n = self.cfg.disc_updates
            for j in range(n):
                state, d_metrics = self.discriminator_step(state, batch, backbone, j, j == n - 1)
            metrics = {**metrics, **d_metrics}
        return state, metrics
