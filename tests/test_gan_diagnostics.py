"""The levers and diagnostics of SF-V's adversarial game that need no compiled UNet: the generator-level
distribution, the per-level discriminator statistics and their log-interval reduction, the heads'
spectral normalisation, the heads on conv_in's map (docs/training.md, "Reading the GAN's health")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.diffusion import edm
from sfv_jax.training import losses
from sfv_jax.training.discriminator import DiscriminatorHeads, spectral_normalize

LEVELS = edm.generator_sigma_levels(4)


def test_generator_level_distribution():
    key, n = jax.random.PRNGKey(3), 6000
    # None: the paper's uniform draw, the same numbers as before the option existed
    uniform = np.asarray(edm.sample_generator_level(key, (n,)))
    np.testing.assert_array_equal(uniform, np.asarray(jax.random.randint(key, (n,), 0, 3)))
    np.testing.assert_array_equal(np.asarray(edm.sample_generator_sigma(key, (n,))), LEVELS[uniform])
    half = np.bincount(np.asarray(edm.sample_generator_level(key, (n,), 4, 0.5)), minlength=3) / n
    assert half[2] == pytest.approx(0.5, abs=0.03) and half[0] == pytest.approx(0.25, abs=0.03), half
    assert np.all(np.asarray(edm.sample_generator_level(key, (n,), 4, 1.0)) == 2)
    assert not np.any(np.asarray(edm.sample_generator_level(key, (n,), 4, 0.0)) == 2)


def _maps(per_sample: list[float]) -> jax.Array:
    """Logit maps [B, F=2, 2, 2] whose per-sample means are ``per_sample`` (a pattern of mean 0 on top)."""
    pattern = jnp.array([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0]).reshape(2, 2, 2)
    return jnp.asarray(per_sample)[:, None, None, None] + pattern[None]


def test_level_statistics_see_what_the_pooled_accuracy_hides():
    """Both logits drift below 0 together (the discriminator's hinge pushes fakes up, reals down): the pooled
    accuracy reads 0.5 (chance) while every pair is ordered right; and one level's fakes ranked more real
    than real next to another level's ranked right average to chance when pooled."""
    real, fake = [_maps([-3.03] * 4)], [_maps([-2.99] * 4)]
    pooled = losses.head_statistics(real, fake, ["spatial"])
    assert float(pooled["d_acc_spatial"]) == pytest.approx(0.5, abs=0.15)
    level = jnp.array([2, 2, 2, 2])
    stats = losses.reduce_interval([jax.device_get(losses.level_statistics(real, fake, ["spatial"], level, LEVELS))])
    assert stats["d_rank_spatial@700"] == 1.0 and stats["d_margin_spatial@700"] == pytest.approx(0.04, abs=1e-5)
    assert "d_rank_spatial@2.27" not in stats  # no sample drew that level
    # level 0 (2.27): fakes above reals by 1; level 2 (700): fakes below reals by 1; two heads of a kind
    real = [_maps([0.0, 0.0, 0.0, 0.0])] * 2
    fake = [_maps([-1.0, -1.0, 1.0, 1.0])] * 2
    level = jnp.array([2, 2, 0, 0])
    per = losses.level_statistics(real, fake, ["temporal", "temporal"], level, LEVELS)
    stats = losses.reduce_interval([jax.device_get(per)])
    assert stats["d_rank_temporal@2.27"] == 1.0 and stats["d_rank_temporal@700"] == 0.0
    assert stats["d_margin_temporal@2.27"] == 1.0 and stats["d_margin_temporal@700"] == -1.0
    # a tie counts one half
    tie = losses.level_statistics([_maps([1.0])], [_maps([1.0])], ["spatial"], jnp.array([1]), LEVELS)
    assert float(tie["sum:d_rank_spatial@70.5"]) == 0.5


def test_log_interval_weighs_levels_by_samples_and_other_metrics_by_steps():
    steps = [
        {
            "g_loss": 1.0,
            "count@700": 3.0,
            "sum:d_rank_spatial@700": 3.0,
            "count@2.27": 0.0,
            "sum:d_rank_spatial@2.27": 0.0,
        },
        {
            "g_loss": 3.0,
            "count@700": 1.0,
            "sum:d_rank_spatial@700": 0.0,
            "count@2.27": 2.0,
            "sum:d_rank_spatial@2.27": 1.0,
        },
    ]
    assert losses.reduce_interval(steps) == {"g_loss": 2.0, "d_rank_spatial@700": 0.75, "d_rank_spatial@2.27": 0.5}
    assert losses.reduce_interval([]) == {}


def test_spectral_norm_makes_every_head_conv_a_contraction():
    """With ``spectral_norm`` the bodies read each conv kernel divided by its largest singular value (numpy's
    SVD of the [window * in, out] matrix: 1 to 1e-4); the parameter tree is the plain heads' (same names and
    shapes, so the option changes no checkpoint layout), the projection is untouched, and off it changes
    nothing."""
    feats = [jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 4, 8))]
    emb, sigma = jnp.ones((2, 5)), jnp.array([0.5, 2.0])
    plain = DiscriminatorHeads("both", channels=8, proj_dim=4, groups=4)
    normed = DiscriminatorHeads("both", channels=8, proj_dim=4, groups=4, spectral_norm=True)
    params = nn.meta.unbox(plain.init(jax.random.PRNGKey(0), feats, emb, sigma)["params"])
    shapes = jax.tree.map(jnp.shape, nn.meta.unbox(normed.init(jax.random.PRNGKey(0), feats, emb, sigma)["params"]))
    assert shapes == jax.tree.map(jnp.shape, params)
    effective = {head: {**p, "body": spectral_normalize(p["body"])} for head, p in params.items()}
    for head in params:
        for conv in ("conv_in", "res_conv1", "res_conv2", "conv_out"):
            k = np.asarray(effective[head]["body"][conv]["kernel"])
            top = np.linalg.svd(k.reshape(-1, k.shape[-1]), compute_uv=False)[0]
            assert top == pytest.approx(1.0, abs=1e-4), (head, conv)
    # the normalised heads = the plain heads applied to the normalised kernels
    want = plain.apply({"params": effective}, feats, emb, sigma)
    got = normed.apply({"params": params}, feats, emb, sigma)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: sum(jnp.sum(o) for o in normed.apply({"params": p}, feats, emb, sigma)))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_heads_on_conv_in_see_the_latents_resolution():
    """``disc.feature_maps="conv_in+blocks"``: the backbone hands conv_in's output (the latents' own
    resolution) before the down blocks' outputs, the heads get a spatial and a temporal head on it, and the
    logits come out at that resolution; "blocks" (the paper's) is unchanged. Shapes only (no compile)."""
    from sfv_jax.configs import tiny
    from sfv_jax.parallel import sharding
    from sfv_jax.training.discriminator import backbone_features, backbone_subset, discriminator_logits
    from sfv_jax.training.layout import build_modules, make_layout

    def layout(feature_maps):
        c = tiny.get_config()
        c.disc.feature_maps = feature_maps
        return c, make_layout(c, sharding.Plan.from_config(c), *build_modules(c))

    (c, paper), (_, wide) = layout("blocks"), layout("conv_in+blocks")
    state = wide.abstract_state
    b, f, h, w = 2, c.data.num_frames, c.data.height // 4, c.data.width // 4  # the toy VAE: 4x smaller
    x = jax.ShapeDtypeStruct((b, f, h, w, 4), jnp.float32)
    sigma = jax.ShapeDtypeStruct((b,), jnp.float32)
    cond = {
        "image_latents": jax.ShapeDtypeStruct((b, h, w, 4), jnp.float32),
        "image_embeds": jax.ShapeDtypeStruct((b, c.model.image_encoder["projection_dim"]), jnp.float32),
        "added_time_ids": jax.ShapeDtypeStruct((b, 3), jnp.float32),
    }
    backbone = backbone_subset(state.unet_params())
    blocks = jax.eval_shape(lambda p, x, s, c_: backbone_features(paper.unet, p, x, s, c_), backbone, x, sigma, cond)
    both = jax.eval_shape(
        lambda p, x, s, c_: backbone_features(wide.unet, p, x, s, c_, "conv_in+blocks"), backbone, x, sigma, cond
    )
    channels = c.model.unet["block_out_channels"]
    assert [a.shape for a in both[1:]] == [a.shape for a in blocks] and len(blocks) == len(channels)
    assert both[0].shape == (b, f, h, w, channels[0]) and blocks[0].shape[2] < h  # the blocks downsample
    assert sorted(state.heads) == sorted(f"{k}_{i}" for k in ("spatial", "temporal") for i in range(len(both)))
    assert len(paper.abstract_state.heads) == 2 * len(blocks)
    logits = jax.eval_shape(
        lambda p, hp, x, s, c_: discriminator_logits(wide.unet, p, wide.heads, hp, x, s, c_),
        backbone,
        state.heads,
        x,
        sigma,
        cond,
    )
    assert len(logits) == 2 * len(both) and logits[0].shape == (b, f, h, w)  # spatial heads first
    with pytest.raises(ValueError, match="feature maps 'x'"):
        jax.eval_shape(lambda p, x, s, c_: backbone_features(paper.unet, p, x, s, c_, "x"), backbone, x, sigma, cond)
