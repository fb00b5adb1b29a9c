"""The embedded default dataset: synthetic videos generated on the fly, deterministic, no download.

Each clip shows 1-3 textured shapes (disc, square, triangle) that move with constant velocity,
bounce off the borders and rotate, over a textured background that drifts: motion matters, so a
generator that copies the conditioning frame is easy to tell apart from real clips. Clip ``i`` of a
dataset with seed ``s`` depends only on (s, i) (``numpy.random.default_rng([s, i])``), so any host can
produce any index and resuming at a sample index reproduces the stream exactly.

    video = synthetic_clip(seed=0, index=17, num_frames=14, height=448, width=768)  # uint8 [F, H, W, 3]
"""

from __future__ import annotations

import numpy as np

TOY_DETAIL = 0.35  # the toy world's texture detail (cli/toy_world.py, configs/toy_teacher.py)
# The toy world's mean colour: each clip is shifted so that its mean over all frames and pixels is this, per
# channel. The toy VAE cannot carry a clip's global colour through SVD's 32-group norms at 64 channels in a
# CPU budget (measured: every clip decoded to one mean colour, 68-77 / 255 against 53-106 in the clips).
TOY_MEAN_COLOUR = 0.4


def _texture(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, waves: int = 3, detail: float = 1.0
) -> np.ndarray:
    """A smooth colour texture: a sum of random oriented sinusoid gratings per channel -> [..., 3] in [0, 1]
    (2..9 cycles per frame, times ``detail``)."""
    out = np.zeros(yy.shape + (3,), np.float32)
    for _ in range(waves):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 9) * detail, rng.uniform(0, 2 * np.pi)
        color = rng.uniform(0.1, 1.0, 3).astype(np.float32)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi + phase)
        out += (0.5 + 0.5 * wave)[..., None] * color
    return out / waves


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates (u, v in units of the shape's radius) in a unit shape."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    # equilateral triangle pointing up
    return (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * np.abs(u) * 0.9)


def synthetic_clip(
    seed: int,
    index: int,
    num_frames: int,
    height: int,
    width: int,
    detail: float = 1.0,
    mean_colour: float | None = None,
) -> np.ndarray:
    """Clip ``index`` of the synthetic dataset ``seed``: uint8 [num_frames, height, width, 3]. ``detail``
    scales the background gratings' frequencies (2..9 cycles per frame at 1.0; the toy world uses 0.35:
    at 32x32 frames and 8x8 latents, 9 cycles are beyond what a latent pixel grid of 8 can hold).
    ``mean_colour`` (in [0, 1]; None: as drawn) shifts each channel so that the clip's mean is that value
    (before clipping to [0, 1]); the draws, shapes and motion are the same either way."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.meshgrid(
        np.linspace(0, 1, height, dtype=np.float32), np.linspace(0, 1, width, dtype=np.float32), indexing="ij"
    )
    drift = rng.uniform(-0.03, 0.03, 2)
    bg_params = rng.integers(0, 2**31)
    shapes = []
    for _ in range(rng.integers(1, 4)):
        shapes.append(
            {
                "kind": str(rng.choice(["disc", "square", "triangle"])),
                "radius": rng.uniform(0.1, 0.25),
                "pos": rng.uniform(0.25, 0.75, 2),
                "vel": rng.uniform(-0.08, 0.08, 2),
                "angle": rng.uniform(0, 2 * np.pi),
                "spin": rng.uniform(-0.4, 0.4),
                "texture_seed": rng.integers(0, 2**31),
            }
        )
    frames = np.empty((num_frames, height, width, 3), np.float32)
    aspect = width / height
    for t in range(num_frames):
        img = _texture(np.random.default_rng(bg_params), yy + drift[0] * t, xx + drift[1] * t, detail=detail)
        for s in shapes:
            # position bounces inside [r, 1 - r] (reflection of the straight-line path)
            p = s["pos"] + s["vel"] * t
            lo, hi = s["radius"], 1.0 - s["radius"]
            span = hi - lo
            p = hi - np.abs((p - lo) % (2 * span) - span)  # triangle wave between lo and hi
            a = s["angle"] + s["spin"] * t
            dy, dx = (yy - p[0]) / s["radius"], (xx - p[1]) * aspect / s["radius"]
            u, v = np.cos(a) * dx + np.sin(a) * dy, -np.sin(a) * dx + np.cos(a) * dy
            mask = _inside(s["kind"], u, v)
            tex = _texture(np.random.default_rng(s["texture_seed"]), v * 0.2, u * 0.2, waves=2)
            img[mask] = 0.25 + 0.75 * tex[mask]
        frames[t] = img
    if mean_colour is not None:
        frames += np.float32(mean_colour) - frames.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    return np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)
