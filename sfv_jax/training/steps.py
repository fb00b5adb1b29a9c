"""The training steps as pure functions: jit them with the static ``Models`` / ``StepConfig`` bound and
the state donated. Two objectives (``StepConfig.objective``, ``config.objective``) share everything here:

  ``sfv``        SF-V's alternating generator and discriminator steps (paper Sec. 3.2, Fig. 2)
  ``diffusion``  SVD's own EDM denoising loss (one step per iteration, no discriminator): fine-tuning
                 SVD, and training the teacher SF-V distils

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
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sfv_jax.diffusion import edm, samplers
from sfv_jax.training import losses, param_groups, programs
from sfv_jax.training.discriminator import DiscriminatorHeads, backbone_features, discriminator_logits

NONFINITE_POLICIES = ("skip", "halt")
# sfv        SF-V (the paper): generator and discriminator steps
# diffusion  SVD's denoising loss (fine-tuning SVD, training a teacher)
# guidance   guidance distillation of a trained generator (beyond the paper): the student regresses onto the frozen
#            start's classifier-free-guided output, so one conditional pass gives what guided sampling gives
OBJECTIVES = ("sfv", "diffusion", "guidance")
SAMPLER = {"sfv": "sfv", "diffusion": "svd", "guidance": "sfv"}  # the sampler of the model each objective trains
OPTIMIZERS = ("sm3", "adamw")
# config opt.optimizer = None: the objective's
DEFAULT_OPTIMIZER = {"sfv": "sm3", "diffusion": "adamw", "guidance": "adamw"}


@dataclasses.dataclass(frozen=True)
class Models:
    """The static halves of the networks (hashable; bound into the jitted steps)."""

    unet: nn.Module
    heads: DiscriminatorHeads


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """SVD's diffusion loss settings (``config.diffusion``; defaults in ``configs/sfv_svd.py``)."""

    p_mean: float  # ln sigma ~ N(p_mean, p_std^2)
    p_std: float
    drop_embed: float  # conditioning dropout probabilities (losses.dropout_mode)
    drop_both: float
    drop_latent: float


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Loss and noise settings (paper Sec. 3.2 / 4). No defaults here: :meth:`from_config` reads them from a
    training config (``objective``, ``loss.*``, ``diffusion.*``, ``opt.ema_rate``, ``opt.nonfinite``),
    whose defaults, the paper's, live in ``configs/sfv_svd.py``."""

    objective: str  # OBJECTIVES
    diffusion: DiffusionConfig
    recon_weight: float  # lambda, Eq. 10
    adv_weight: float  # the adversarial term's weight in Eq. 10 (1: the paper; 0: reconstruction only)
    huber_c: float | None  # Eq. 9; None: 0.00054 * sqrt(elements per sample)
    generator_grid: int  # T_g
    sigma_max_prob: float | None  # P[sigma_g = sigma_max] (edm.sample_generator_level); None: uniform (paper)
    discriminator_levels: int  # T_d
    p_mean: float  # Eq. 7
    p_std: float
    r1_type: str  # losses.R1_TYPES
    r1_gamma: float
    r1_alpha: float  # approximate R1 perturbation
    grad_balance: bool  # log the adversarial / reconstruction gradient norms at the generator's output
    ema_rate: float
    nonfinite: str  # NONFINITE_POLICIES
    disc_updates: int  # discriminator updates per generator update (paper: 1)
    # ADD's teacher term (losses.distillation_loss; not in the paper, 0: off): its weight and the teacher's
    # per-frame guidance, first and last frame; the renoising levels are the teacher's training levels
    # (``diffusion.p_mean`` / ``p_std``)
    distill_weight: float
    distill_min_guidance: float
    distill_max_guidance: float

    @classmethod
    def from_config(cls, config: Any) -> StepConfig:
        """``objective``, ``diffusion`` from theirs, every other field from ``config.loss``, else
        ``config.opt`` (a ConfigDict or nested dicts)."""
        loss, opt, diff = config["loss"], config["opt"], config["diffusion"]
        rest = [f.name for f in dataclasses.fields(cls) if f.name not in ("objective", "diffusion")]
        return cls(
            objective=config["objective"],
            diffusion=DiffusionConfig(**{f.name: diff[f.name] for f in dataclasses.fields(DiffusionConfig)}),
            **{name: loss[name] if name in loss else opt[name] for name in rest},
        )

    @property
    def has_discriminator(self) -> bool:
        return self.objective == "sfv"

    @property
    def needs_teacher(self) -> bool:
        """Whether the generator step runs a whole frozen UNet (SF-V's distillation term; the guidance objective's
        frozen start), not only the teacher's encoder (the discriminator's backbone) or nothing."""
        return self.objective == "guidance" or (self.has_discriminator and self.distill_weight > 0)


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


# ----------------------------------------------------------------------------- forward pieces


def conditioning(micro: dict) -> dict:
    """The conditioning entries of a micro-batch: ``image_latents``, ``image_embeds``, ``added_time_ids``."""
    return {k: micro[k] for k in ("image_latents", "image_embeds", "added_time_ids")}


def sample_noise(key: jax.Array, index: jax.Array, shape: tuple[int, ...], cfg: StepConfig) -> dict:
    """Per-sample draws from ``fold_in(key, index)``: generator sigma [m] (and its index ``level_g`` [m] into
    ``edm.generator_sigma_levels``), discriminator sigma' [m] and their eps [m, *shape] (one sigma' and eps
    per sample, shared by its real and fake; Fig. 2)."""
    levels = jnp.asarray(edm.generator_sigma_levels(cfg.generator_grid))

    def one(i):
        kg, kd, keg, ked = jax.random.split(jax.random.fold_in(key, i), 4)
        level = edm.sample_generator_level(kg, (), cfg.generator_grid, cfg.sigma_max_prob)
        return {
            "level_g": level,
            "sigma_g": levels[level],
            "sigma_d": edm.sample_discriminator_sigma(kd, (), cfg.discriminator_levels, cfg.p_mean, cfg.p_std),
            "eps_g": jax.random.normal(keg, shape),
            "eps_d": jax.random.normal(ked, shape),
        }

    return jax.vmap(one)(index)


def generate(unet: nn.Module, params: Any, x_t: jax.Array, sigma: jax.Array, cond: dict) -> jax.Array:
    """x0_hat = c_skip x_t + c_out G(c_in x_t; c_noise, c) (Eq. 6 with the erratum fixed), float32."""
    dtype = unet.dtype
    lat = jnp.broadcast_to(cond["image_latents"][:, None], x_t.shape[:-1] + cond["image_latents"].shape[-1:])

    def velocity(x_in, c_noise):
        sample = jnp.concatenate([x_in.astype(dtype), lat.astype(dtype)], axis=-1)
        return unet.apply(
            {"params": params}, sample, c_noise, cond["image_embeds"][:, None].astype(dtype), cond["added_time_ids"]
        )

    return edm.denoise(velocity, x_t, sigma)


def guided_denoise(unet: nn.Module, params: Any, x: jax.Array, sigma: jax.Array, cond: dict, scales: jax.Array):
    """The teacher's classifier-free-guided denoiser D_u + g_f (D_c - D_u) (the pipeline's guidance, applied to
    D instead of the velocity: the same, D being affine in it with coefficients shared by both halves). One
    forward pass of the doubled batch [uncond, cond]; ``x`` [B, F, h, w, C], ``sigma`` [B], ``scales`` [F]."""
    b = x.shape[0]
    null_latents, null_embeds = samplers.null_condition(cond["image_latents"], cond["image_embeds"])
    both = {
        "image_latents": jnp.concatenate([null_latents, cond["image_latents"]]),
        "image_embeds": jnp.concatenate([null_embeds, cond["image_embeds"]]),
        "added_time_ids": jnp.concatenate([cond["added_time_ids"], cond["added_time_ids"]]),
    }
    d = generate(unet, params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), both)
    return samplers.apply_guidance(d[:b], d[b:], scales)


# the distillation term's sigma and eps: fold_in(key, DISTILL_NOISE_STREAM) then per sample; above every sample
# index, whose fold_in(key, index) draws the other terms' noise
DISTILL_NOISE_STREAM = 2**31 - 1


def distillation_term(x0_hat: jax.Array, micro: dict, teacher: Any, key: jax.Array, *, models: Models, cfg: StepConfig):
    """ADD's teacher term on one micro-batch (losses.distillation_loss): x0_hat renoised at sigma ~ the teacher's
    training levels, the frozen teacher's guided denoising of it the target. ``teacher``: the whole frozen UNet
    tree. Draws from their own stream, so the other terms' noise is the same with the term on or off."""
    k_sigma, k_eps = jax.random.split(jax.random.fold_in(key, DISTILL_NOISE_STREAM))
    sigma = jax.vmap(
        lambda i: losses.sample_training_sigma(
            jax.random.fold_in(k_sigma, i), (), cfg.diffusion.p_mean, cfg.diffusion.p_std
        )
    )(micro["index"])
    eps = per_sample_normal(k_eps, micro["index"], x0_hat.shape[1:])
    noisy = jax.lax.stop_gradient(x0_hat) + sigma[:, None, None, None, None] * eps
    scales = samplers.guidance_scales(cfg.distill_min_guidance, cfg.distill_max_guidance, x0_hat.shape[1])
    target = guided_denoise(models.unet, teacher, noisy, sigma, conditioning(micro), scales)
    return losses.distillation_loss(x0_hat, target, sigma)


def _huber_c(cfg: StepConfig, x0: jax.Array) -> float:
    return cfg.huber_c if cfg.huber_c is not None else losses.pseudo_huber_c(x0[0].size)


def generator_loss_fn(gen_params, micro: dict, frozen, backbone, head_params, key, *, models: Models, cfg: StepConfig):
    """Eq. 10 on one micro-batch: x_t = x0 + sigma eps; x0_hat = G(x_t); D sees x0_hat + sigma' eps'."""
    gen_params = param_groups.merge(gen_params, frozen)
    x0 = micro["latents"].astype(jnp.float32)
    n = sample_noise(key, micro["index"], x0.shape[1:], cfg)
    cond = conditioning(micro)
    x0_hat = generate(
        models.unet, gen_params, x0 + n["sigma_g"][:, None, None, None, None] * n["eps_g"], n["sigma_g"], cond
    )

    def d(x0_hat):
        fake = x0_hat + n["sigma_d"][:, None, None, None, None] * n["eps_d"]
        return discriminator_logits(models.unet, backbone, models.heads, head_params, fake, n["sigma_d"], cond)

    loss, aux = losses.generator_loss(
        d(x0_hat), x0_hat, x0, recon_weight=cfg.recon_weight, huber_c=_huber_c(cfg, x0), adv_weight=cfg.adv_weight
    )
    metrics = {"g_loss": loss, "g_adv": aux["adv"], "g_recon": aux["recon"]}
    if cfg.needs_teacher:  # ``backbone`` is then the whole frozen teacher (layout.whole_teacher)
        distill = distillation_term(x0_hat, micro, backbone, key, models=models, cfg=cfg)
        loss = loss + cfg.distill_weight * distill
        metrics |= {"g_loss": loss, "g_distill": distill}
    if cfg.grad_balance:
        # which term drives the generator: each term's gradient norm at its output x0_hat (one more
        # backward pass through the discriminator; not through the generator)
        out = jax.lax.stop_gradient(x0_hat)
        g_adv = jax.grad(lambda x: losses.generator_adversarial_loss(d(x)))(out)
        g_rec = jax.grad(lambda x: losses.pseudo_huber_loss(x, x0, _huber_c(cfg, x0)))(out)
        metrics["g_adv_out_grad"] = optax.tree.norm(g_adv)
        metrics["g_recon_out_grad"] = cfg.recon_weight * optax.tree.norm(g_rec)
        if cfg.needs_teacher:
            g_dis = jax.grad(lambda x: distillation_term(x, micro, backbone, key, models=models, cfg=cfg))(out)
            metrics["g_distill_out_grad"] = cfg.distill_weight * optax.tree.norm(g_dis)
    return loss, metrics


R1_NOISE_STREAM = 1  # the approximate R1's perturbation: per_sample_normal(fold_in(key, R1_NOISE_STREAM), ...)


def per_sample_normal(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[m, *shape] standard normals, sample j's from ``fold_in(key, index[j])``: a micro-batch split leaves
    each sample's draw unchanged."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(index)


def discriminator_loss_fn(head_params, micro: dict, gen_params, backbone, key, *, models: Models, cfg: StepConfig):
    """Eq. 11 on one micro-batch (the fake from the current generator, ``gen_params`` the full UNet tree,
    no gradient into it) + gamma * R1."""
    x0 = micro["latents"].astype(jnp.float32)
    n = sample_noise(key, micro["index"], x0.shape[1:], cfg)
    cond = conditioning(micro)
    s_g = n["sigma_g"][:, None, None, None, None]
    x0_hat = jax.lax.stop_gradient(generate(models.unet, gen_params, x0 + s_g * n["eps_g"], n["sigma_g"], cond))
    s_d = n["sigma_d"][:, None, None, None, None]
    real, fake = x0 + s_d * n["eps_d"], x0_hat + s_d * n["eps_d"]

    def d(x):
        return discriminator_logits(models.unet, backbone, models.heads, head_params, x, n["sigma_d"], cond)

    real_logits, fake_logits = d(real), d(fake)
    hinge = losses.discriminator_hinge_loss(real_logits, fake_logits)
    kinds = models.heads.logit_kinds(len(real_logits))
    stats = losses.head_statistics(real_logits, fake_logits, kinds)
    stats |= losses.level_statistics(
        real_logits, fake_logits, kinds, n["level_g"], edm.generator_sigma_levels(cfg.generator_grid)
    )
    if cfg.r1_type == "paper":
        r1 = losses.r1_penalty(d, real)
    elif cfg.r1_type == "features":
        feats = backbone_features(models.unet, backbone, real, n["sigma_d"], cond, models.heads.feature_maps)
        feats = jax.lax.stop_gradient(feats)
        r1 = losses.r1_penalty(
            lambda f: models.heads.apply({"params": head_params}, f, cond["image_embeds"], n["sigma_d"]), feats
        )
    elif cfg.r1_type == "approx":
        noise = per_sample_normal(jax.random.fold_in(key, R1_NOISE_STREAM), micro["index"], x0.shape[1:])
        r1 = losses.approximate_r1(d, real, noise, cfg.r1_alpha)
    elif cfg.r1_type == "none":
        r1 = jnp.zeros((), jnp.float32)
    else:
        raise ValueError(f"r1_type {cfg.r1_type!r} is not one of {losses.R1_TYPES}")
    loss = hinge + cfg.r1_gamma * r1
    # gamma * R1 against the hinge: whether R1 regularises at all (docs/method.md, "Losses")
    r1_share = cfg.r1_gamma * r1 / jnp.maximum(hinge, 1e-12)
    return loss, {"d_loss": loss, "d_hinge": hinge, "d_r1": r1, "d_r1_share": r1_share, **jax.lax.stop_gradient(stats)}


def diffusion_noise(key: jax.Array, index: jax.Array, shape: tuple[int, ...], cfg: DiffusionConfig) -> dict:
    """Per-sample draws of the diffusion objective from ``fold_in(key, index)``: sigma [m], eps
    [m, *shape] and the conditioning dropout flags ``drop_embed``, ``drop_latent`` [m] bool."""

    def one(i):
        ks, ke, kd = jax.random.split(jax.random.fold_in(key, i), 3)
        drop_embed, drop_latent = losses.dropout_mode(
            jax.random.uniform(kd, ()), cfg.drop_embed, cfg.drop_both, cfg.drop_latent
        )
        return {
            "sigma": losses.sample_training_sigma(ks, (), cfg.p_mean, cfg.p_std),
            "eps": jax.random.normal(ke, shape),
            "drop_embed": drop_embed,
            "drop_latent": drop_latent,
        }

    return jax.vmap(one)(index)


def diffusion_loss_fn(gen_params, micro: dict, frozen, backbone, head_params, key, *, models: Models, cfg: StepConfig):
    """SVD's denoising loss on one micro-batch: sigma ~ lognormal(P_mean, P_std), x_t = x0 + sigma eps,
    loss = mean w(sigma) (D(x_t; sigma) - x0)^2 with D the preconditioned UNet (``edm.denoise``, the
    generator's and the teacher sampler's) on the conditioning after dropout. ``backbone`` and
    ``head_params`` are unused (the generator loss's signature)."""
    del backbone, head_params
    x0 = micro["latents"].astype(jnp.float32)
    n = diffusion_noise(key, micro["index"], x0.shape[1:], cfg.diffusion)
    cond = losses.drop_conditions(conditioning(micro), n["drop_embed"], n["drop_latent"])
    x_t = x0 + n["sigma"][:, None, None, None, None] * n["eps"]
    denoised = generate(models.unet, param_groups.merge(gen_params, frozen), x_t, n["sigma"], cond)
    loss = losses.diffusion_loss(denoised, x0, n["sigma"])
    return loss, {"g_loss": loss, "cond_dropped": jnp.mean((n["drop_embed"] | n["drop_latent"]).astype(jnp.float32))}


def guidance_loss_fn(gen_params, micro: dict, frozen, backbone, head_params, key, *, models: Models, cfg: StepConfig):
    """Guidance distillation on one micro-batch (Meng et al. 2023, for the SF-V generator): x_t = x0 + sigma eps at
    SF-V's generator levels (``sample_noise``: the same draws as SF-V's), target = the frozen start's guided
    output (:func:`guided_denoise`, per frame ``distill_min_guidance`` -> ``distill_max_guidance``), loss = mean
    squared error of the student's conditional output against it. The target is a fixed function of x_t and the
    conditioning, so the regression has no blur to average over. ``backbone`` is the frozen start (the whole
    UNet); ``head_params`` is unused."""
    del head_params
    x0 = micro["latents"].astype(jnp.float32)
    n = sample_noise(key, micro["index"], x0.shape[1:], cfg)
    cond = conditioning(micro)
    x_t = x0 + n["sigma_g"][:, None, None, None, None] * n["eps_g"]
    scales = samplers.guidance_scales(cfg.distill_min_guidance, cfg.distill_max_guidance, x0.shape[1])
    target = jax.lax.stop_gradient(guided_denoise(models.unet, backbone, x_t, n["sigma_g"], cond, scales))
    out = generate(models.unet, param_groups.merge(gen_params, frozen), x_t, n["sigma_g"], cond)
    loss = jnp.mean(jnp.square(out - target))
    return loss, {"g_loss": loss}


def denoising_losses(unet: nn.Module, params: Any, micro: dict, sigmas: Any, key: jax.Array) -> jax.Array:
    """The held-out measure of a diffusion model: the EDM-weighted denoising loss of one micro-batch at
    each fixed noise level of ``sigmas`` [n], no conditioning dropout, eps from ``fold_in(key, index)``
    (the same noise for every level and every call). ``params``: the full UNet tree. -> [len(sigmas)]."""
    x0 = micro["latents"].astype(jnp.float32)
    eps = per_sample_normal(key, micro["index"], x0.shape[1:])

    def one(sigma):  # one UNet in the program, whatever the number of levels
        s = jnp.full((x0.shape[0],), sigma, jnp.float32)
        return losses.diffusion_loss(generate(unet, params, x0 + sigma * eps, s, conditioning(micro)), x0, s)

    return jax.lax.map(one, jnp.asarray(sigmas, jnp.float32))


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
    fn = {"sfv": generator_loss_fn, "diffusion": diffusion_loss_fn, "guidance": guidance_loss_fn}[cfg.objective]
    loss_fn = functools.partial(fn, models=models, cfg=cfg)
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
        # (sfv_jax.training.programs): a second run finds its steps in jit's cache, traced and loaded
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
