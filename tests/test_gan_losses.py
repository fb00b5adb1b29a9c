"""The GAN terms and diagnostics of ``sfv_jax.training.losses`` beyond the paper's equations: the per-head-kind
logit statistics, the reconstruction gradient at the generator's output (what ``loss.grad_balance`` logs) and
the adversarial weight of Eq. 10."""

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
