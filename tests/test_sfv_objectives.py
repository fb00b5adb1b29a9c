"""SF-V's noise samplers, losses, R1 variants, EMA and discriminator heads (paper Sec. 3.2-3.3), against
hand computations and finite differences. No UNet here: these compile in seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.diffusion import edm
from sfv_jax.training import losses
from sfv_jax.training import steps as train_steps
from sfv_jax.training.discriminator import DiscriminatorHeads


def test_generator_grid_and_levels():
    np.testing.assert_allclose(edm.karras_grid(4), [0.002, 2.269, 70.54, 700.0], rtol=2e-4)
    np.testing.assert_allclose(edm.generator_sigma_levels(), [2.269, 70.54, 700.0], rtol=2e-4)
    draws = np.asarray(edm.sample_generator_sigma(jax.random.PRNGKey(0), (3000,)))
    values, counts = np.unique(draws, return_counts=True)
    np.testing.assert_allclose(values, edm.generator_sigma_levels())
    assert counts.min() > 900  # uniform over the three levels


def test_discriminator_sigma_lognormal():
    levels, probs = edm.discriminator_sigma_distribution(1000, -1.0, -1.0)
    assert levels.shape == probs.shape == (999,) and np.all(probs >= 0) and probs.sum() == pytest.approx(1.0)
    cdf = np.cumsum(probs)
    assert levels[np.searchsorted(cdf, 0.5)] == pytest.approx(0.37, abs=0.02)
    assert levels[np.searchsorted(cdf, 0.05)] == pytest.approx(0.07, abs=0.01)
    assert levels[np.searchsorted(cdf, 0.95)] == pytest.approx(1.9, abs=0.1)
    # P_std = -1 is the same distribution as +1 (the sign only flips every weight before normalising)
    np.testing.assert_allclose(probs, edm.discriminator_sigma_distribution(1000, -1.0, 1.0)[1], rtol=1e-9)
    draws = np.asarray(edm.sample_discriminator_sigma(jax.random.PRNGKey(1), (20000,)))
    assert np.median(draws) == pytest.approx(0.37, abs=0.02)


def test_losses_equal_hand_computation():
    real = [jnp.array([[-2.0, 0.5], [-1.0, 3.0]]), jnp.array([[0.0]])]
    fake = [jnp.array([[2.0, -0.5], [1.0, 0.0]]), jnp.array([[-3.0]])]
    # Eq. 11: mean max(0, 1 + D(real)) + mean max(0, 1 - D(fake)), heads averaged
    hand_real = (np.mean([0, 1.5, 0, 4.0]) + 1.0) / 2
    hand_fake = (np.mean([0, 1.5, 0, 1.0]) + 4.0) / 2
    assert float(losses.discriminator_hinge_loss(real, fake)) == pytest.approx(hand_real + hand_fake)
    # Eq. 8: E[D(fake)]
    assert float(losses.generator_adversarial_loss(fake)) == pytest.approx((np.mean([2, -0.5, 1, 0]) - 3.0) / 2)
    # Eq. 9: per-sample sqrt(||d||^2 + c^2) - c, batch mean
    a = np.arange(12, dtype=np.float32).reshape(2, 6) / 10
    b = np.ones((2, 6), np.float32)
    c = 0.3
    hand = np.mean([np.sqrt(np.sum((a[i] - b[i]) ** 2) + c * c) - c for i in range(2)])
    assert float(losses.pseudo_huber_loss(a, b, c)) == pytest.approx(hand, rel=1e-6)
    assert losses.pseudo_huber_c(14 * 56 * 96 * 4) == pytest.approx(0.00054 * np.sqrt(14 * 56 * 96 * 4))
    # Eq. 10
    total, aux = losses.generator_loss(fake, a, b, recon_weight=0.1, huber_c=c)
    assert float(total) == pytest.approx(float(aux["adv"]) + 0.1 * hand, rel=1e-6)


def _finite_difference_r1(scalar_fn, x: np.ndarray, eps: float = 1e-6) -> float:
    """E_batch ||grad_x D(x)||^2 with central differences (everything float64, see ``x64``)."""
    grads = np.zeros_like(x, np.float64)
    flat = x.reshape(-1)
    for j in range(flat.size):
        e = np.zeros_like(flat)
        e[j] = eps
        plus = np.asarray(scalar_fn((flat + e).reshape(x.shape)), np.float64)
        minus = np.asarray(scalar_fn((flat - e).reshape(x.shape)), np.float64)
        grads.reshape(-1)[j] = (plus - minus).sum() / (2 * eps)  # sample j // per-sample size owns element j
    return float(np.mean(np.sum(grads.reshape(x.shape[0], -1) ** 2, axis=1)))


@pytest.fixture
def x64():
    """Finite differences need float64 end to end (the heads' GroupNorm statistics follow the input dtype)."""
    with jax.enable_x64(True):
        yield


def _heads_setup(dtype=np.float32):
    jdtype = jnp.float64 if dtype == np.float64 else jnp.float32
    heads = DiscriminatorHeads("both", channels=8, proj_dim=4, dtype=jdtype, param_dtype=jdtype)
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, 3, 4, 4, 8)).astype(dtype), rng.standard_normal((2, 3, 2, 2, 16)).astype(dtype)]
    emb, sigma = rng.standard_normal((2, 6)).astype(dtype), np.array([0.5, 2.0], dtype)
    params = jax.jit(heads.init)(jax.random.PRNGKey(0), feats, emb, sigma)["params"]
    return heads, params, feats, emb, sigma


def test_r1_on_head_inputs_equals_finite_differences(x64):
    """The "features" variant: gradient w.r.t. the backbone features fed to the heads."""
    heads, params, feats, emb, sigma = _heads_setup(np.float64)
    fn = jax.jit(lambda f: heads.apply({"params": params}, f, emb, sigma))
    got = float(
        jax.jit(lambda f: losses.r1_penalty(lambda g: heads.apply({"params": params}, g, emb, sigma), f))(feats)
    )
    small = feats[1]  # finite differences over the smaller map; the larger one enters through its own term

    def scalar_small(x):
        return losses.logit_sum(fn([feats[0], x]))

    def scalar_big(x):
        return losses.logit_sum(fn([x, feats[1]]))

    want = _finite_difference_r1(scalar_small, small) + _finite_difference_r1(scalar_big, feats[0])
    assert got == pytest.approx(want, rel=1e-6)


def test_r1_on_the_real_input_equals_finite_differences(x64):
    """The paper's form: gradient w.r.t. D's input, here through a small "backbone" into the heads."""
    heads, params, _, emb, sigma = _heads_setup(np.float64)
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((4, 8)) * 0.5, rng.standard_normal((4, 16)) * 0.5
    x = rng.standard_normal((2, 3, 4, 4, 4))

    def d(x):
        f1 = jnp.tanh(x @ w1)
        f2 = jnp.tanh(x[:, :, ::2, ::2] @ w2)
        return heads.apply({"params": params}, [f1, f2], emb, sigma)

    got = float(jax.jit(lambda x: losses.r1_penalty(d, x))(x))
    want = _finite_difference_r1(jax.jit(lambda x: losses.logit_sum(d(x))), x)
    assert got == pytest.approx(want, rel=1e-6)
    # approximate R1: E (D(x) - D(x + alpha n))^2
    noise = rng.standard_normal(x.shape)
    approx = float(jax.jit(lambda x, n: losses.approximate_r1(d, x, n, 0.1))(x, noise))
    ls = jax.jit(lambda x: losses.logit_sum(d(x)))
    hand = np.mean((np.asarray(ls(x)) - np.asarray(ls(x + 0.1 * noise))) ** 2)
    assert approx == pytest.approx(float(hand), rel=1e-4)


def test_ema_maths():
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    new = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(-1.0)}
    got = train_steps.ema_update(ema, new, 0.95)
    np.testing.assert_allclose(got["a"], [0.95 * 1 + 0.05 * 3, 0.95 * 2], rtol=1e-6)
    assert float(got["b"]) == pytest.approx(0.95 * 3 - 0.05)


@pytest.mark.parametrize("kind,count", [("both", 4), ("spatial", 2), ("temporal", 2)])
def test_heads_selectable_and_shaped(kind, count):
    heads = DiscriminatorHeads(kind, channels=8, proj_dim=4)
    _, _, feats, emb, sigma = _heads_setup()
    params = jax.jit(heads.init)(jax.random.PRNGKey(0), feats, emb, sigma)["params"]
    out = jax.jit(heads.apply)({"params": params}, feats, emb, sigma)
    assert len(out) == count and len(params) == count
    assert [o.shape for o in out[: count // 2 or 1]] == [(2, 3, 4, 4), (2, 3, 2, 2)][: count // 2 or 1]
