"""The training objectives as pure pieces: their settings (``StepConfig``), the per-sample noise draws and each
objective's loss on one micro-batch. ``sfv_jax.training.steps`` accumulates their gradients and applies the
updates; tests import the losses directly.

  ``sfv``        SF-V's generator loss (Eq. 10) and discriminator loss (Eq. 11) (paper Sec. 3.2, Fig. 2), with,
                 beyond the paper and off by default, the teacher term of adversarial diffusion distillation
  ``diffusion``  SVD's own EDM denoising loss (no discriminator): fine-tuning SVD, and training the teacher SF-V
                 distils
  ``guidance``   guidance distillation of a trained generator (beyond the paper): the student regresses onto the
                 frozen start's classifier-free-guided output

A micro-batch is a dict of arrays (``sfv_jax.training.steps`` describes the batch; here without its leading
micro-batch axis): ``latents`` [m, F, h, w, 4], ``image_latents`` [m, h, w, 4], ``image_embeds`` [m, D],
``added_time_ids`` [m, 3], ``index`` [m] int32. Per-sample noise comes from ``fold_in(key, index)``, so a
sample's draw does not depend on how the batch is split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sfv_jax.diffusion import edm, samplers
from sfv_jax.training import losses, param_groups
from sfv_jax.training.discriminator import DiscriminatorHeads, backbone_features, discriminator_logits

# sfv        SF-V (the paper): generator and discriminator steps
# diffusion  SVD's denoising loss (fine-tuning SVD, training a teacher)
# guidance   guidance distillation of a trained generator (beyond the paper): the student regresses onto the frozen
#            start's classifier-free-guided output, so one conditional pass gives what guided sampling gives
OBJECTIVES = ("sfv", "diffusion", "guidance")
SAMPLER = {"sfv": "sfv", "diffusion": "svd", "guidance": "sfv"}  # the sampler of the model each objective trains


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
    nonfinite: str  # steps.NONFINITE_POLICIES
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


# the generator-side loss of each objective: f(gen_params, micro, frozen, backbone, head_params, key, *, models, cfg)
GENERATOR_LOSS = {"sfv": generator_loss_fn, "diffusion": diffusion_loss_fn, "guidance": guidance_loss_fn}
