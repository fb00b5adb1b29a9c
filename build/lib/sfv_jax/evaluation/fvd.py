"""Frechet Video Distance (Unterthiner et al. 2019) with the Flax I3D.

    from sfv_jax.evaluation import fvd
    score = fvd.compute_fvd(videos_a, videos_b)          # uint8 [N, T, H, W, 3] each (T >= 9) -> float

    features = fvd.I3DFeatures()                         # jitted I3D over all local devices
    stats = fvd.FeatureStats.empty()
    for batch in batches:                                # streaming: any number of batches, any order
        stats.update(features(batch))                    # [n, 400] float32 -> float64 running mean / M2
    mu, sigma = stats.mean, stats.covariance
    fvd.frechet_distance(mu, sigma, mu_real, sigma_real)

Preprocessing (the FVD reference code's): frames resized to 224x224 (bilinear, half-pixel centres, no
antialiasing; the aspect ratio is not kept), scaled from [0, 255] to [-1, 1]; features are I3D's 400
Kinetics logits averaged over time. The statistics are float64 on the host: a running mean and centred
second moment merged batch by batch (Chan et al.'s parallel update), so one pass over any number of
batches (or processes) gives the same Gaussian fit as ``np.cov`` of all features at once (unbiased,
N - 1). The Frechet distance

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

is computed with symmetric eigendecompositions: Tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i) for the
eigenvalues of the symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2) (similar to S_1 S_2), with rounding
negatives clipped, so it is real and stable even for singular covariances (N <= 400 videos), where
``scipy.linalg.sqrtm`` needs an epsilon fix-up. Published FVDs use N = 2048; with N <= 400 the
covariance is rank deficient and the number is for smoke tests only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sfv_jax.evaluation import i3d

FEATURE_DIM = i3d.NUM_CLASSES


def preprocess(videos: jnp.ndarray) -> jnp.ndarray:
    """uint8 (or [0, 255] float) videos [B, T, H, W, 3] -> float32 [B, T, 224, 224, 3] in [-1, 1]."""
    b, t, h, w, c = videos.shape
    x = videos.astype(jnp.float32)
    if (h, w) != (i3d.SIZE, i3d.SIZE):
        x = jax.image.resize(x, (b, t, i3d.SIZE, i3d.SIZE, c), method="bilinear", antialias=False)
    return x / 127.5 - 1.0


class I3DFeatures:
    """FVD features of uint8 videos: ``features(videos [N, T, H, W, 3]) -> float32 [N, 400]``.

    Runs jitted, batch split over ``devices`` (default: this process's local devices) with
    ``batch_size`` videos per device per call; N need not divide anything (the last call is padded).
    ``dtype`` is the compute dtype (float32 gives the reference numbers)."""

    def __init__(
        self,
        variables: dict | None = None,
        *,
        devices: Sequence[Any] | None = None,
        batch_size: int = 4,
        dtype: Any = jnp.float32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.asarray(self.devices), ("batch",))
        self.batch_size = batch_size
        self.model = i3d.I3D(dtype=dtype)
        variables = variables if variables is not None else i3d.load_variables()
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        self._sharding = NamedSharding(self.mesh, P("batch"))
        model = self.model
        self._apply = jax.jit(lambda v, x: model.apply(v, preprocess(x)), out_shardings=NamedSharding(self.mesh, P()))

    @property
    def step(self) -> int:
        """Videos per call: ``batch_size`` x devices."""
        return self.batch_size * len(self.devices)

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"videos must be [N, T, H, W, 3]; got shape {videos.shape}")
        if videos.shape[1] < i3d.MIN_FRAMES:
            raise ValueError(f"FVD needs at least {i3d.MIN_FRAMES} frames per video (I3D); got {videos.shape[1]}")
        if videos.dtype != np.uint8:
            raise ValueError(
                f"videos must be uint8 in [0, 255]; got {videos.dtype} (video_io.to_uint8 converts [0, 1] floats)"
            )
        out = []
        for i in range(0, len(videos), self.step):
            chunk = videos[i : i + self.step]
            n = len(chunk)
            if n < self.step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.step - n, axis=0)])
            x = jax.device_put(chunk, self._sharding)
            out.append(np.asarray(self._apply(self.variables, x), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


@dataclasses.dataclass
class FeatureStats:
    """Streaming Gaussian fit of features, float64: ``n``, ``mean`` [D], ``m2`` [D, D] (the centred sum of
    outer products). ``update`` adds a batch; ``merge`` combines two fits (e.g. from two processes)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D]; got shape {f.shape}")
        mean = f.mean(axis=0) if len(f) else np.zeros(f.shape[1])
        centred = f - mean
        return cls(len(f), mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Chan et al.'s pairwise update: exact, in any order."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"feature sizes differ: {self.mean.shape} vs {other.mean.shape}")
        n = self.n + other.n
        if other.n == 0:
            return self
        if self.n == 0:
            return dataclasses.replace(other)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureStats(n, mean, m2)

    def update(self, features: np.ndarray) -> FeatureStats:
        """Add a batch [n, D] in place (and return self)."""
        merged = self.merge(FeatureStats.of(features))
        self.n, self.mean, self.m2 = merged.n, merged.mean, merged.m2
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance [D, D] (as ``np.cov(features, rowvar=False)``); needs n >= 2."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 videos; have {self.n}")
        return self.m2 / (self.n - 1)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write ``n``, ``mean``, ``m2`` (npz)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, n=np.int64(self.n), mean=self.mean, m2=self.m2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(int(z["n"]), np.asarray(z["mean"], np.float64), np.asarray(z["m2"], np.float64))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (module doc)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (
        ("mu1", mu1, (d,)),
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}; expected {shape} (means [D], covariances [D, D])")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite values")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fvd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def compute_fvd(videos_a: np.ndarray, videos_b: np.ndarray, *, features: I3DFeatures | None = None) -> float:
    """FVD between two sets of uint8 videos [N, T, H, W, 3] (T >= 9; any H, W; N may differ between sets)."""
    features = features if features is not None else I3DFeatures()
    stats = [FeatureStats.of(features(v)) for v in (videos_a, videos_b)]
    return fvd_from_stats(*stats)
