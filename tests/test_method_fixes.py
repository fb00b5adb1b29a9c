"""Issue 17's method fixes and GAN diagnostics, as pure pieces: the discriminator's conditioning embedding,
the per-head-kind logit statistics, the generator's gradient balance at its output, the R1 share, fresh
augmentation noise per epoch, and the cheap video metrics and frame grids the reports use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.data import video_io, video_metrics
from sfv_jax.diffusion import edm
from sfv_jax.models.embeddings import timestep_embedding
from sfv_jax.training import discriminator, losses


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
    # the review's finding, measured: as printed, most of the noise sinusoid does not move over sigma'
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


def test_sfv_sampler_levels():
    np.testing.assert_allclose(edm.sfv_sigmas(3), edm.generator_sigma_levels()[::-1], rtol=1e-6)
    with pytest.raises(ValueError, match="never trained on"):
        edm.sfv_sigmas(4)
    assert edm.sfv_sigmas(4, untrained=True)[-1] == pytest.approx(edm.SIGMA_MIN, rel=1e-5)


def test_augmentation_noise_is_fresh_each_epoch():
    """Live encoding draws the conditioning frame's augmentation noise from the sample's global position,
    so a record seen again in a later epoch (another position) gets new noise; the same position repeats."""
    from sfv_jax.data.latents import ClipEncoder
    from sfv_jax.models import build, presets

    vae = build.vae_from_config(presets.VAES["toy"])
    clip = build.image_encoder_from_config(presets.IMAGE_ENCODERS["toy"])
    enc = ClipEncoder(
        vae,
        vae.init(jax.random.PRNGKey(0), *build.init_args(vae))["params"],
        clip,
        clip.init(jax.random.PRNGKey(1), *build.init_args(clip))["params"],
    )
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8)
    kw = dict(fps=7, motion_bucket_ids=[127], noise_aug_strength=0.5)
    a, b, again = (enc(frames, np.array([p]), **kw)["image_latents"] for p in (3, 3 + 1000, 3))
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).max() > 1e-3


def test_video_metrics():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    still = np.repeat(video[:, :1], 5, axis=1)
    assert video_metrics.motion(still) == 0.0
    assert video_metrics.motion(video) == pytest.approx(np.abs(np.diff(video.astype(float), axis=1)).mean())
    blurred = ((video.astype(np.float64) + np.roll(video, 1, 2) + np.roll(video, 1, 3)) / 3).astype(np.uint8)
    assert video_metrics.sharpness(blurred) < 0.5 * video_metrics.sharpness(video)
    assert video_metrics.psnr(video, video) == float("inf")
    noisy = np.clip(video.astype(int) + 5 * (rng.integers(0, 2, video.shape) * 2 - 1), 0, 255).astype(np.uint8)
    mse = np.mean((noisy.astype(float) - video) ** 2)
    assert video_metrics.psnr(noisy, video) == pytest.approx(10 * np.log10(255**2 / mse))
    assert video_metrics.frame0_fidelity(video, video[:, 0]) == float("inf")
    with pytest.raises(ValueError, match=r"uint8 \[N, T, H, W, 3\]"):
        video_metrics.motion(video[0])
    with pytest.raises(ValueError, match="one shape"):
        video_metrics.psnr(video, video[:1])


def test_frame_grid(tmp_path):
    a = np.zeros((3, 4, 5, 3), np.uint8)
    b = np.full((3, 4, 5, 3), 1.0, np.float32)
    grid = video_io.frame_grid([a, b], gap=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
    assert grid[:4, :5].max() == 0 and grid[5:, :5].min() == 255 and grid[4].min() == 255
    path = video_io.write_video(tmp_path / "g.png", grid[None])
    assert video_io.read_video(path)[0].shape == (1, *grid.shape)
    with pytest.raises(video_io.VideoError, match="one shape"):
        video_io.frame_grid([a, a[:2]])


def test_reconstruction_only_ablation_drops_the_adversarial_term():
    """loss.adv_weight (issue 17's "reconstruction only" row): 0 leaves lambda * L_recon; 1 is Eq. 10."""
    rng = np.random.default_rng(2)
    fake = [jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32)]
    x0_hat, x0 = (jnp.asarray(rng.standard_normal((2, 3, 4, 4, 2)), jnp.float32) for _ in range(2))
    kw = dict(recon_weight=0.1, huber_c=0.03)
    full, aux = losses.generator_loss(fake, x0_hat, x0, **kw)
    only, _ = losses.generator_loss(fake, x0_hat, x0, **kw, adv_weight=0.0)
    assert float(full) == float(aux["adv"] + 0.1 * aux["recon"])
    assert float(only) == pytest.approx(0.1 * float(aux["recon"]), rel=1e-7)
