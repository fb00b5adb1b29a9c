"""EDM noise levels and preconditioning of SVD, pure functions (docs/method.md; docs/svd_port.md, "Sampling pipeline").

SVD predicts v with the EDM preconditioning for sigma_data = 1:

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))
    c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1),  c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = 0.25 * ln(sigma).

Noise levels come from the Karras grid (paper Eq. 5) between SIGMA_MIN = 0.002 and SIGMA_MAX = 700
with rho = 7. Grids here are returned high-to-low (sampling order), as diffusers' scheduler does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0
SFV_GRID_SIZE = 4  # T_g: the generator's grid (paper Sec. 3.2)

# (x_in [B, F, h, w, 4] = c_in * x, c_noise scalar) -> F(x_in; c_noise), the network's v prediction.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> np.ndarray:
    """Paper Eq. 5, high to low: ``(smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho`` for
    i = 0 .. n-1, computed in float64 and returned as float32 [n] (diffusers' ``_convert_to_karras``).
    ``n == 1`` gives ``[sigma_max]``."""
    if n < 1:
        raise ValueError(f"the number of noise levels must be >= 1, got {n}")
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).astype(np.float32)


def euler_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> np.ndarray:
    """The SVD teacher's schedule: ``karras_sigmas(num_steps)`` followed by 0, float32 [num_steps + 1]
    (diffusers' EulerDiscreteScheduler with use_karras_sigmas and final_sigmas_type "zero")."""
    return np.concatenate([karras_sigmas(num_steps, sigma_min, sigma_max), np.zeros(1, np.float32)])


def sfv_sigmas(num_steps: int, grid_size: int = SFV_GRID_SIZE, *, untrained: bool = False) -> np.ndarray:
    """The SF-V generator's noise levels for ``num_steps`` steps: the highest ``num_steps`` levels of the
    T_g-point Karras grid, high to low. T_g = 4: [700, 70.54, 2.269, 0.002][:num_steps].

    The generator trains on the T_g - 1 highest levels only (:func:`generator_sigma_levels`), so by
    default 1..T_g - 1 steps are allowed; ``untrained=True`` also allows T_g steps, whose last one
    denoises at sigma_min = 0.002, a level the generator never saw (the paper's 4-step row)."""
    top = grid_size if untrained else grid_size - 1
    if not 1 <= num_steps <= top:
        hint = "" if untrained else f"; {grid_size} steps would denoise at sigma_min, a level it never trained on"
        raise ValueError(
            f"the SF-V sampler takes 1 to {top} steps (the trained levels of its {grid_size}-point grid{hint}), "
            f"got {num_steps}"
        )
    return karras_sigmas(grid_size)[:num_steps]


def init_noise_sigma(sigma_max: jax.Array | float) -> jax.Array:
    """Scale of the initial noise, ``sqrt(sigma_max^2 + 1)`` (diffusers' init_noise_sigma with "leading"
    spacing; 700.000714 for SVD)."""
    sigma_max = jnp.asarray(sigma_max, jnp.float32)
    return jnp.sqrt(sigma_max * sigma_max + 1.0)


def c_skip(sigma: jax.Array) -> jax.Array:
    return 1.0 / (sigma * sigma + 1.0)


def c_out(sigma: jax.Array) -> jax.Array:
    return -sigma / jnp.sqrt(sigma * sigma + 1.0)


def c_in(sigma: jax.Array) -> jax.Array:
    return 1.0 / jnp.sqrt(sigma * sigma + 1.0)


def c_noise(sigma: jax.Array) -> jax.Array:
    """The UNet's timestep input, 0.25 * ln(sigma)."""
    return 0.25 * jnp.log(sigma)


def _per_sample(sigma: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar sigma, or one per sample [B], broadcast against x [B, ...]."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma if sigma.ndim == 0 else sigma.reshape(-1, *([1] * (x.ndim - 1)))


def x0_from_v(v: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x0 = c_out * v + c_skip * x, in diffusers' operation order (v * (-sigma / sqrt(sigma^2 + 1)) +
    x / (sigma^2 + 1)), float32. ``v``, ``x`` [B, F, h, w, C]; ``sigma`` a scalar or [B]."""
    s = _per_sample(sigma, x)
    x = x.astype(jnp.float32)
    return v.astype(jnp.float32) * c_out(s) + x / (s * s + 1.0)


def denoise(velocity_fn: VelocityFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): paper Eq. 6 with its erratum fixed (c_skip
    multiplies x_t, not x0; docs/method.md, "Generator"). It is both the teacher's denoiser and the SF-V generator.

    ``x`` [B, F, h, w, 4] noisy latents at level ``sigma`` (a scalar, or [B] one per sample; the
    velocity function then gets c_noise [B]) -> the denoised estimate, float32."""
    s = _per_sample(sigma, x)
    x = x.astype(jnp.float32)
    x_in = x / jnp.sqrt(s * s + 1.0)  # c_in * x, as diffusers' scale_model_input divides
    return x0_from_v(velocity_fn(x_in, c_noise(jnp.asarray(sigma, jnp.float32))), x, sigma)


# ----------------------------------------------------------------------------- training noise (paper Sec. 3.2)


def karras_grid(
    num_levels: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> np.ndarray:
    """Paper Eq. 5 in its own order, low to high: sigma_0 = sigma_min ... sigma_{T-1} = sigma_max, float32 [T].
    T = 4: [0.002, 2.269, 70.54, 700]."""
    return karras_sigmas(num_levels, sigma_min, sigma_max, rho)[::-1].copy()


def generator_sigma_levels(grid_size: int = SFV_GRID_SIZE) -> np.ndarray:
    """{sigma_1, ..., sigma_{T_g - 1}} of the T_g grid, the generator's training noise levels (T_g = 4:
    [2.269, 70.54, 700])."""
    return karras_grid(grid_size)[1:]


def sample_generator_level(
    key: jax.Array, shape: tuple[int, ...] = (), grid_size: int = SFV_GRID_SIZE, sigma_max_prob: float | None = None
) -> jax.Array:
    """The index (int32 ``shape``) into :func:`generator_sigma_levels` of the generator's training level.

    ``sigma_max_prob`` None: uniform over the levels (paper Sec. 3.2). A probability p: the largest level
    (the one-step sampler's) with probability p, otherwise uniform over the others. With T_g - 1 levels,
    p = 1 / (T_g - 1) is the paper's distribution (other draws); p = 1 trains the one-step path only."""
    n = len(generator_sigma_levels(grid_size))
    if sigma_max_prob is None:
        return jax.random.randint(key, shape, 0, n)
    k_top, k_rest = jax.random.split(key)
    top = jax.random.bernoulli(k_top, sigma_max_prob, shape)
    return jnp.where(top, n - 1, jax.random.randint(k_rest, shape, 0, max(n - 1, 1)))


def sample_generator_sigma(
    key: jax.Array, shape: tuple[int, ...] = (), grid_size: int = SFV_GRID_SIZE, sigma_max_prob: float | None = None
) -> jax.Array:
    """sigma_t over :func:`generator_sigma_levels` as :func:`sample_generator_level` draws it (default:
    uniform, paper Sec. 3.2), float32 ``shape``."""
    levels = jnp.asarray(generator_sigma_levels(grid_size))
    return levels[sample_generator_level(key, shape, grid_size, sigma_max_prob)]


def discriminator_sigma_distribution(
    num_levels: int = 1000, p_mean: float = -1.0, p_std: float = -1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The discretised lognormal over the T_d Karras grid (paper Eq. 7, with the argument corrected to
    (ln sigma'_t - P_mean) / (sqrt(2) P_std); docs/method.md, "Discriminator noise").

    Returns (levels sigma'_1 .. sigma'_{T_d - 1} low to high, probabilities), float64. Bin t has weight
    erf(arg(sigma'_t)) - erf(arg(sigma'_{t-1})). With P_std < 0 every weight is negative; normalising
    by their sum makes them the same positive distribution as P_std = -P_std (weights are never clipped).
    """
    from math import erf, sqrt

    grid = karras_grid(num_levels).astype(np.float64)
    cdf = np.array([erf((np.log(s) - p_mean) / (sqrt(2.0) * p_std)) for s in grid])
    weights = np.diff(cdf)
    probs = weights / weights.sum()
    if not np.all(probs >= 0):
        raise ValueError(f"discriminator sigma weights change sign (P_mean={p_mean}, P_std={p_std})")
    return grid[1:], probs


def sample_discriminator_sigma(
    key: jax.Array, shape: tuple[int, ...] = (), num_levels: int = 1000, p_mean: float = -1.0, p_std: float = -1.0
) -> jax.Array:
    """sigma' drawn from :func:`discriminator_sigma_distribution`, float32 ``shape``.

    Inverse-CDF sampling as ``jax.random.choice(p=...)`` does it (one uniform per draw, ``searchsorted``
    on the cumulative weights), with the cumulative weights summed here in NumPy: inside the program a
    1000-long cumulative sum of constants is folded by the compiler, which took seconds per step program."""
    levels, probs = discriminator_sigma_distribution(num_levels, p_mean, p_std)
    cdf = jnp.asarray(np.cumsum(probs.astype(np.float32), dtype=np.float32))
    u = cdf[-1] * (1 - jax.random.uniform(key, shape, jnp.float32))
    idx = jnp.searchsorted(cdf, u)
    return jnp.asarray(levels, jnp.float32)[idx]
