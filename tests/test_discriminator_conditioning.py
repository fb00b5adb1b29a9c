"""The discriminator heads' conditioning (docs/method.md, "Discriminator"): the sinusoids of sigma' and the
frame index as printed and spread over the UNet's timestep range, and how much each lets the heads see sigma'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.diffusion import edm
from sfv_jax.models.embeddings import timestep_embedding
from sfv_jax.training import discriminator


def _embedding_spread(embedding: str) -> float:
    """Fraction of the 256 noise-sinusoid features that change by > 0.5 over SVD's sigma range."""
    sigmas = jnp.asarray(np.geomspace(edm.SIGMA_MIN, edm.SIGMA_MAX, 64), jnp.float32)
    noise_in, _ = discriminator.cond_inputs(sigmas, 14, embedding)
    emb = np.asarray(timestep_embedding(noise_in, 256))
    return float(np.mean(emb.max(axis=0) - emb.min(axis=0) > 0.5))


def test_cond_embedding_paper_is_as_printed_and_spread_uses_its_range():
    sigma = jnp.asarray([edm.SIGMA_MIN, 1.0, edm.SIGMA_MAX], jnp.float32)
    noise_in, frame_in = discriminator.cond_inputs(sigma, 14, "paper")
    np.testing.assert_array_equal(noise_in, edm.c_noise(sigma))
    np.testing.assert_array_equal(frame_in, np.arange(14, dtype=np.float32))
    noise_in, frame_in = discriminator.cond_inputs(sigma, 14, "spread")
    np.testing.assert_allclose(np.asarray(noise_in)[[0, 2]], [0.0, 1000.0], atol=1e-3)
    assert 0 < float(noise_in[1]) < 1000
    np.testing.assert_allclose(frame_in, np.linspace(0, 1000, 14), rtol=1e-6)
    # measured: as printed, most of the noise sinusoid does not move over sigma'
    paper, spread = _embedding_spread("paper"), _embedding_spread("spread")
    assert paper < 0.2 and spread > 0.7, (paper, spread)  # measured: 0.13 and 0.79
    with pytest.raises(ValueError, match="cond_embedding 'x'"):
        discriminator.cond_inputs(sigma, 14, "x")


def test_heads_with_spread_embedding_see_sigma():
    """The same features at two sigma' give logits that differ far more with the spread embedding. Init and
    apply are jitted, as in the trainer (the spread embedding once failed while traced)."""
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((1, 3, 4, 4, 8)).astype(np.float32)]
    emb = rng.standard_normal((1, 6)).astype(np.float32)
    change = {}
    for kind in discriminator.COND_EMBEDDINGS:
        heads = discriminator.DiscriminatorHeads("both", channels=8, proj_dim=4, cond_embedding=kind)
        params = jax.jit(heads.init)(jax.random.PRNGKey(0), feats, emb, np.ones(1, np.float32))["params"]
        apply = jax.jit(heads.apply)
        lo, hi = (apply({"params": params}, feats, emb, np.full(1, s, np.float32)) for s in (0.05, 50.0))
        change[kind] = float(sum(jnp.abs(a - b).mean() for a, b in zip(lo, hi, strict=True)))
    assert change["spread"] > 3 * change["paper"], change
    assert heads.logit_kinds(2) == ["spatial", "temporal"]
    assert discriminator.DiscriminatorHeads("temporal").logit_kinds(3) == ["temporal"] * 3
