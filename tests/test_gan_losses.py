"""The GAN terms and diagnostics of ``sfv_jax.training.losses`` beyond the paper's equations: the per-head-kind
logit statistics, the reconstruction gradient at the generator's output (what ``loss.grad_balance`` logs) and
the adversarial weight of Eq. 10, and adversarial diffusion distillation's teacher term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.training import losses


def test_head_statistics_by_kind():
    real = [jnp.asarray([[-2.0, 1.0]]), jnp.asarray([[-1.0, -3.0]])]  # spatial, temporal
    fake = [jnp.asarray([[3.0, -1.0]]), jnp.asarray([[1.0, 1.0]])]
    got = {k: float(v) for k, v in losses.head_statistics(real, fake, ["spatial", "temporal"]).items()}
    assert got == pytest.approx(
        {
            "d_real_spatial": -0.5,
            "d_fake_spatial": 1.0,
            "d_acc_spatial": 0.5,  # half the real pixels < 0, half the fake ones > 0
            "d_real_temporal": -2.0,
            "d_fake_temporal": 1.0,
            "d_acc_temporal": 1.0,
        }
    )


def test_recon_gradient_balance_matches_closed_form():
    """g_recon_out_grad is lambda * ||d L_recon / d x0_hat||: Eq. 9's gradient is d / (B sqrt(|d|^2 + c^2))."""
    rng = np.random.default_rng(1)
    x0_hat, x0 = rng.standard_normal((2, 3, 4, 4, 2)), rng.standard_normal((2, 3, 4, 4, 2))
    c = 0.3
    g = jax.grad(lambda x: losses.pseudo_huber_loss(x, jnp.asarray(x0, jnp.float32), c))(
        jnp.asarray(x0_hat, jnp.float32)
    )
    d = (x0_hat - x0).reshape(2, -1)
    want = d / (2 * np.sqrt(np.sum(d * d, axis=1, keepdims=True) + c * c))
    np.testing.assert_allclose(np.asarray(g).reshape(2, -1), want, rtol=1e-5, atol=1e-7)


def test_reconstruction_only_ablation_drops_the_adversarial_term():
    """loss.adv_weight (the reproduction's "reconstruction only" row): 0 leaves lambda * L_recon; 1 is Eq. 10."""
    rng = np.random.default_rng(2)
    fake = [jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32)]
    x0_hat, x0 = (jnp.asarray(rng.standard_normal((2, 3, 4, 4, 2)), jnp.float32) for _ in range(2))
    kw = dict(recon_weight=0.1, huber_c=0.03)
    full, aux = losses.generator_loss(fake, x0_hat, x0, **kw)
    only, _ = losses.generator_loss(fake, x0_hat, x0, **kw, adv_weight=0.0)
    assert float(full) == float(aux["adv"] + 0.1 * aux["recon"])
    assert float(only) == pytest.approx(0.1 * float(aux["recon"]), rel=1e-7)


def test_distillation_loss_is_alpha_weighted_squared_error_without_gradient_into_the_target():
    """mean_b alpha(sigma_b) mean (x - t)^2 with alpha = 1 / sqrt(1 + sigma^2); the gradient reaches the student's
    output only (the teacher's target is a constant)."""
    x = jnp.asarray([[1.0, 2.0], [0.0, 0.0]])
    t = jnp.asarray([[0.0, 0.0], [3.0, -1.0]])
    sigma = jnp.asarray([0.0, np.sqrt(3.0)])  # alpha 1 and 1/2
    want = 0.5 * ((1 + 4) / 2 * 1.0 + (9 + 1) / 2 * 0.5)
    assert float(losses.distillation_loss(x, t, sigma)) == pytest.approx(want)
    gx, gt = jax.grad(losses.distillation_loss, argnums=(0, 1))(x, t, sigma)
    np.testing.assert_allclose(np.asarray(gx), 0.5 * np.asarray([[1.0, 2.0], [-1.5, 0.5]]), rtol=1e-6)
    assert not np.any(np.asarray(gt))
