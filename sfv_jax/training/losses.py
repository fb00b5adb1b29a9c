"""The training objectives' losses as pure functions: SF-V's (paper Sec. 3.2, Eqs. 8-11; docs/method.md, "Losses")
and SVD's diffusion loss (EDM, Karras et al. 2022, with SVD's v-prediction preconditioning; the end of
this file).

Sign convention: the paper's, as printed. The discriminator pushes real logits to <= -1 and fake logits
to >= +1 (Eq. 11: max(0, 1 + D(real)) + max(0, 1 - D(fake))), and the generator minimises E[D(fake)]
(Eq. 8), i.e. it pulls fake logits towards the real side. Every head gives a map of per-pixel logits;
a head's loss is the mean over its pixels, frames and batch, and the heads are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from sfv_jax.diffusion import samplers

R1_TYPES = ("none", "paper", "features", "approx")


def _up(x: jax.Array) -> jax.Array:
    """At least float32 (float64 stays float64, for finite-difference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mean_over_heads(per_head: Sequence[jax.Array]) -> jax.Array:
    return sum(per_head) / len(per_head)


def discriminator_hinge_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Eq. 11 without R1: E[max(0, 1 + D(x'_t))] + E[max(0, 1 - D(x_hat'_t))], per pixel, averaged over heads."""
    real = _mean_over_heads([jnp.mean(jax.nn.relu(1.0 + _up(r))) for r in real_logits])
    fake = _mean_over_heads([jnp.mean(jax.nn.relu(1.0 - _up(f))) for f in fake_logits])
    return real + fake


def generator_adversarial_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Eq. 8: L_adv^G = E[D(c_in(sigma') x_hat'_t)], averaged over heads."""
    return _mean_over_heads([jnp.mean(_up(f)) for f in fake_logits])


def pseudo_huber_c(elements_per_sample: int, factor: float = 0.00054) -> float:
    """The consistency-training choice c = 0.00054 * sqrt(d), d = elements per sample (docs/method.md, "Losses")."""
    return factor * math.sqrt(elements_per_sample)


def pseudo_huber_loss(x0_hat: jax.Array, x0: jax.Array, c: float) -> jax.Array:
    """Eq. 9: sqrt(||x0_hat - x0||_2^2 + c^2) - c per sample (norm over all but the batch axis), batch mean."""
    d = (x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)).reshape(x0.shape[0], -1)
    return jnp.mean(jnp.sqrt(jnp.sum(d * d, axis=1) + c * c) - c)


def generator_loss(
    fake_logits: Sequence[jax.Array],
    x0_hat: jax.Array,
    x0: jax.Array,
    *,
    recon_weight: float,
    huber_c: float,
    adv_weight: float = 1.0,
) -> tuple[jax.Array, dict]:
    """Eq. 10: L^G = L_adv^G + lambda * L_recon (``adv_weight`` 0: the reconstruction-only ablation).
    Returns (loss, {"adv", "recon"})."""
    adv = generator_adversarial_loss(fake_logits)
    recon = pseudo_huber_loss(x0_hat, x0, huber_c)
    return adv_weight * adv + recon_weight * recon, {"adv": adv, "recon": recon}


def distillation_loss(x0_hat: jax.Array, target: jax.Array, sigma: jax.Array) -> jax.Array:
    """Adversarial diffusion distillation's teacher term (Sauer et al. 2023, ADD Eq. 4; not in SF-V): the
    student's output pulled towards the teacher's guided denoising of it, renoised at ``sigma`` [B]:
    mean over samples of alpha(sigma) * mean over elements (x0_hat - sg[target])^2, alpha = 1 / sqrt(1 + sigma^2)
    (ADD's c(t) = alpha_t: high noise, where the teacher's estimate is a blur, weighs least). ``x0_hat``,
    ``target`` [B, F, h, w, C]; no gradient flows into ``target``."""
    d = _up(x0_hat) - jax.lax.stop_gradient(_up(target))
    per_sample = jnp.mean((d * d).reshape(d.shape[0], -1), axis=1)
    return jnp.mean(per_sample / jnp.sqrt(1.0 + _up(sigma) ** 2))


def head_statistics(
    real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array], kinds: Sequence[str]
) -> dict[str, jax.Array]:
    """A GAN's health per head kind (``kinds[i]`` names head i: "spatial" | "temporal"): the mean real and
    fake logits and the accuracy 0.5 * (P[D(real) < 0] + P[D(fake) > 0]) over pixels, frames, samples
    and that kind's heads (0.5: chance; 1: the discriminator wins everywhere). Keys ``d_real_<kind>``,
    ``d_fake_<kind>``, ``d_acc_<kind>``."""
    out = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        real = _mean_over_heads([jnp.mean(_up(real_logits[i])) for i in idx])
        fake = _mean_over_heads([jnp.mean(_up(fake_logits[i])) for i in idx])
        acc = _mean_over_heads(
            [
                0.5
                * (
                    jnp.mean((real_logits[i] < 0).astype(jnp.float32))
                    + jnp.mean((fake_logits[i] > 0).astype(jnp.float32))
                )
                for i in idx
            ]
        )
        out.update({f"d_real_{kind}": real, f"d_fake_{kind}": fake, f"d_acc_{kind}": acc})
    return out


SUM_PREFIX, COUNT_PREFIX = "sum:", "count@"  # metric keys the log interval reduces as sums / counts


def level_label(sigma: float) -> str:
    """A generator level's tag in metric names: ``f"{sigma:.3g}"`` (T_g = 4: "2.27", "70.5", "700")."""
    return f"{float(sigma):.3g}"


def level_statistics(
    real_logits: Sequence[jax.Array],
    fake_logits: Sequence[jax.Array],
    kinds: Sequence[str],
    level: jax.Array,
    levels: Sequence[float],
) -> dict[str, jax.Array]:
    """The discriminator's grip on the generator at each of its training levels, per head kind.

    A sample's score is its logits' mean over pixels, frames and that kind's heads; real and fake share
    sigma' and eps (Fig. 2), so each sample is a pair. Per level l (``level`` [B] indexes ``levels``):
      ``margin`` = mean over the level's samples of score(fake) - score(real) (the hinge pushes fakes up,
                 reals down: > 0 when the heads separate them, growing while they learn a fixed generator)
      ``rank``   = the fraction of its pairs ordered right, score(fake) > score(real) (ties count 1/2;
                 0.5 chance, < 0.5 when the heads call the generator's output more real than real)
    Unlike the pooled ``d_acc_<kind>``, neither depends on where both logits drift, nor mixes levels whose
    fakes fail in opposite ways (over-smoothed at sigma_max, over-sharpened at the lowest level).

    Returned as sums and counts so that micro-batches, steps and a log interval average them by sample
    (:func:`reduce_interval`): ``sum:d_margin_<kind>@<l>``, ``sum:d_rank_<kind>@<l>``, ``count@<l>``."""
    out = {}
    for i, sigma in enumerate(levels):
        out[f"{COUNT_PREFIX}{level_label(sigma)}"] = jnp.sum((level == i).astype(jnp.float32))
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        gap = logit_sum([fake_logits[i] for i in idx]) - logit_sum([real_logits[i] for i in idx])  # [B]
        right = (gap > 0).astype(gap.dtype) + 0.5 * (gap == 0).astype(gap.dtype)
        for i, sigma in enumerate(levels):
            mask = (level == i).astype(gap.dtype)
            out[f"{SUM_PREFIX}d_margin_{kind}@{level_label(sigma)}"] = jnp.sum(mask * gap)
            out[f"{SUM_PREFIX}d_rank_{kind}@{level_label(sigma)}"] = jnp.sum(mask * right)
    return out


def reduce_interval(per_step: Sequence[dict[str, float]]) -> dict[str, float]:
    """One log line's metrics from the steps since the last (host floats): every metric's mean over the
    steps, except :func:`level_statistics`' sums, which become ``name@l`` = total sum / total count of
    level l (samples, not steps, weigh; a level no sample drew in the interval is left out)."""
    if not per_step:
        return {}
    out, sums = {}, {}
    for key in per_step[0]:
        values = [float(m[key]) for m in per_step]
        if key.startswith(SUM_PREFIX):
            sums[key[len(SUM_PREFIX) :]] = sum(values)
        elif key.startswith(COUNT_PREFIX):
            continue
        else:
            out[key] = sum(values) / len(values)
    for name, total in sums.items():
        count = sum(float(m[COUNT_PREFIX + name.rsplit("@", 1)[1]]) for m in per_step)
        if count > 0:
            out[name] = total / count
    return out


def logit_sum(logits: Sequence[jax.Array]) -> jax.Array:
    """Per-sample scalar D output that R1 differentiates: each head's mean over its pixels and frames,
    averaged over heads -> [B] (so a sample's penalty does not depend on the batch it is in)."""
    return _mean_over_heads([jnp.mean(_up(lg).reshape(lg.shape[0], -1), axis=1) for lg in logits])


def r1_penalty(fn: Callable[[jax.Array], Sequence[jax.Array]], inputs) -> jax.Array:
    """R1 = E_batch ||d D(x) / d x||^2 (Mescheder et al.; paper Eq. 11), D's per-sample scalar
    :func:`logit_sum`. ``inputs`` is an array [B, ...] or a list of them (head inputs: all of them form
    one gradient). ``fn`` maps ``inputs`` to the logits list.

    * type "paper": ``inputs`` = the real noisy latents fed to the backbone (second order through it)
    * type "features": ``inputs`` = the backbone features fed to the heads (cheaper; LADD-style)
    """
    grads = jax.grad(lambda x: jnp.sum(logit_sum(fn(x))))(inputs)
    sq = sum(jnp.sum(_up(g).reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))
    return jnp.mean(sq)


def approximate_r1(
    fn: Callable[[jax.Array], Sequence[jax.Array]], x: jax.Array, noise: jax.Array, alpha: float
) -> jax.Array:
    """Approximate R1 of adversarial post-training: E_batch (D(x) - D(x + alpha * noise))^2 on real data,
    with D's per-sample scalar :func:`logit_sum`. No second-order gradient."""
    diff = logit_sum(fn(x)) - logit_sum(fn(x + alpha * noise.astype(x.dtype)))
    return jnp.mean(diff * diff)


# ----------------------------------------------------------------------------- SVD's diffusion objective

DROP_MODES = ("none", "embed", "both", "latent")  # conditioning dropout outcomes, in draw order


def sample_training_sigma(key: jax.Array, shape: tuple[int, ...], p_mean: float, p_std: float) -> jax.Array:
    """sigma ~ lognormal: ln sigma ~ N(P_mean, P_std^2) (EDM's training distribution; SVD fine-tuning
    practice: 0.7 / 1.6), float32 ``shape``."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


def edm_loss_weight(sigma: jax.Array) -> jax.Array:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 with sigma_data = 1."""
    sigma = _up(sigma)
    return (sigma * sigma + 1.0) / (sigma * sigma)


def diffusion_loss(denoised: jax.Array, x0: jax.Array, sigma: jax.Array) -> jax.Array:
    """mean over samples and elements of w(sigma) (D(x_t; sigma) - x0)^2. ``denoised``, ``x0`` [B, ...],
    ``sigma`` [B]."""
    d = _up(denoised) - _up(x0)
    per_sample = jnp.mean((d * d).reshape(d.shape[0], -1), axis=1)
    return jnp.mean(edm_loss_weight(sigma) * per_sample)


def dropout_mode(u: jax.Array, p_embed: float, p_both: float, p_latent: float) -> tuple[jax.Array, jax.Array]:
    """Conditioning dropout for classifier-free guidance from a uniform draw ``u`` [B]: the embedding alone
    with probability ``p_embed``, both with ``p_both``, the conditioning latent alone with ``p_latent``
    (the three bands [0, pe), [pe, pe + pb), [pe + pb, pe + pb + pl) of ``u``; the layout of SVD
    fine-tuning scripts, where one probability p gives pe = pb = pl = p). -> (drop_embed, drop_latent) bool [B]."""
    drop_embed = u < p_embed + p_both
    drop_latent = (u >= p_embed) & (u < p_embed + p_both + p_latent)
    return drop_embed, drop_latent


def drop_conditions(cond: dict, drop_embed: jax.Array, drop_latent: jax.Array) -> dict:
    """``cond`` with the dropped samples' image embedding / conditioning latent replaced by exact zeros,
    which is what the teacher sampler feeds its unconditional branch
    (:func:`sfv_jax.diffusion.samplers.null_condition`). ``added_time_ids`` are kept (the sampler keeps them too)."""

    def where(drop, null, x):
        return jnp.where(drop.reshape(-1, *([1] * (x.ndim - 1))), null, x)

    null_latents, null_embeds = samplers.null_condition(cond["image_latents"], cond["image_embeds"])
    return {
        **cond,
        "image_embeds": where(drop_embed, null_embeds, cond["image_embeds"]),
        "image_latents": where(drop_latent, null_latents, cond["image_latents"]),
    }
