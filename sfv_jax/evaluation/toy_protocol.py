"""The toy-scale reproduction's protocol (``python -m sfv_jax.cli.reproduce``; docs/reproduction.md): its rows, its real
clips and each row's metrics. The paper's Tables 1-3 at toy size: FVD with the project's I3D plus cheap
metrics that the synthetic moving shapes make meaningful (``data.video_metrics``).

Reference set: ``num_videos`` held-out toy-world clips (32x32, 14 frames, synthetic seed
``REFERENCE_SEED + seed``); row video i is generated from reference clip i's first frame with noise seed
``seed * 1_000_003 + i``, so every row sees the same images and noise. The "real" row is a second
held-out set of the same size (``HELD_OUT_SEED + seed``): FVD's floor at this N.

    rows = select_rows(["teacher", "sfv"])        # names or prefixes; None: all
    real = reference_clips(seed, n)                # uint8 [n, 14, 32, 32, 3]
    m = row_metrics(videos, real, features, real_stats)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfv_jax.data import video_io, video_metrics
from sfv_jax.data.synthetic import TOY_DETAIL, TOY_MEAN_COLOUR, synthetic_clip
from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.evaluation.fvd import FeatureStats, I3DFeatures, fvd_from_stats

# the shipped toy teacher (assets/toy_teacher/README.md: how it was made); the reproduction's default
TOY_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "toy_teacher"
REFERENCE_SEED = 2_000_003
HELD_OUT_SEED = 3_000_017
SIZE, FRAMES, FPS = 32, 14, 7
TEACHER_STEPS = (1, 2, 4, 8, 16, 25)  # the paper's SVD baseline at toy size (guidance 1 -> 3)
# the teacher without guidance: how much of its colour and FVD is guidance, which SF-V does not use
UNGUIDED_STEPS = (4, 25)
SFV_STEPS = (1, 2, 3)  # the generator's trained levels (T_g = 4)

# SF-V training runs: config overrides on configs/toy_sfv.py. "sfv" is the toy default: the paper's method
# with three changes chosen by the reproduction's seeds (docs/reproduction.md): no reconstruction term
# (lambda 0), temporal heads only, half of the generator's updates at sigma_max. "sfv_paper" puts the
# paper's values back (lambda 0.1, both heads, the generator's levels uniform).
BOTH_UNIFORM = {"disc.heads": "both", "loss.sigma_max_prob": None}  # the paper's heads and levels
PAPER = {**BOTH_UNIFORM, "loss.recon_weight": 0.1}
RUNS: dict[str, dict[str, Any]] = {
    "sfv": {},
    "sfv_paper": PAPER,
    # the paper's ablations (Tables 2 and 3, the reconstruction / adversarial terms, R1), from the toy default
    "sfv_both_heads": {"disc.heads": "both"},
    "sfv_spatial": {"disc.heads": "spatial"},
    "sfv_p-2_-1": {"loss.p_mean": -2.0, "loss.p_std": -1.0},
    "sfv_p0_1": {"loss.p_mean": 0.0, "loss.p_std": 1.0},
    "sfv_p1_1": {"loss.p_mean": 1.0, "loss.p_std": 1.0},
    "sfv_recon_only": {"loss.adv_weight": 0.0, "loss.recon_weight": 0.1},
    "sfv_with_recon": {"loss.recon_weight": 0.1},
    "sfv_r1_none": {"loss.r1_type": "none"},
    "sfv_r1_paper": {"loss.r1_type": "paper"},
    "sfv_r1_approx": {"loss.r1_type": "approx"},
    # the R1 weight (the paper's 1e-5 gives gamma * R1 / hinge < 1e-7 here): a sweep over gamma
    "sfv_r1_g10": {"loss.r1_gamma": 10.0},
    "sfv_r1_g100": {"loss.r1_gamma": 100.0},
    "sfv_r1_g1000": {"loss.r1_gamma": 1000.0},
    # the options that differ from the paper, against its behaviour: the heads' sigma' / frame-index sinusoids
    # spread over their range, and SM3 without the toy config's 20 warm-up steps
    "sfv_spread": {"disc.cond_embedding": "spread"},
    "sfv_warmup0": {"opt.warmup_steps": 0},
    # the heads at the paper's size (configs/sfv_svd.py) instead of configs/tiny.py's 32 channels
    "sfv_heads128": {"disc.channels": 128, "disc.proj_dim": 64, "disc.groups": 32},
    # the adversarial game's levers (docs/training.md): the generator's levels uniform (the paper's; the
    # default trains half of its updates at sigma_max, the one-step sampler's level) or all at sigma_max,
    # spectrally normalised heads, two discriminator updates per generator update, heads on conv_in's map
    # too (the latents' resolution), and conv_in heads with spectral norm
    "sfv_uniform": {"loss.sigma_max_prob": None},
    "sfv_top100": {"loss.sigma_max_prob": 1.0},
    "sfv_sn": {"disc.spectral_norm": True},
    "sfv_d2": {"opt.disc_updates": 2},
    "sfv_conv_in": {"disc.feature_maps": "conv_in+blocks"},
    "sfv_conv_in_sn": {"disc.feature_maps": "conv_in+blocks", "disc.spectral_norm": True},
    # the optimizer and the batch: AdamW with bias correction and SM3's momenta (0.5, 0.999), no weight decay,
    # instead of SM3 (its first steps are 31.6 / sqrt(t) x the learning rate); four micro-batches
    # accumulated per update (16 clips instead of 4, four times the cost of a step)
    "sfv_adam": {"opt.optimizer": "adamw", "opt.adamw_b1": 0.5, "opt.weight_decay": 0.0},
    "sfv_b16": {"data.accum_steps": 4},
    # beyond the paper: adversarial diffusion distillation's teacher term (the frozen teacher's guided denoising
    # of the generator's renoised output), weighted so that its gradient at the generator's output matches the
    # adversarial term's (about 10x: 0.0026 against 0.027 at weight 1, 20 steps of seed 2). Measured worse than
    # the default on seeds 2 and 3 (less motion, no more colour: docs/reproduction.md)
    "sfv_distill": {"loss.distill_weight": 10.0},
    # beyond the paper: guidance distillation (objective "guidance") of the toy default's trained generator, its
    # start (RUN_STARTS): the student regresses onto that generator sampled with the teacher's guidance 1 -> 3,
    # so one conditional pass, without guidance at sampling, gives what the guided row gives with two
    "sfv_cfg": {"objective": "guidance"},
    # the default before the heads and the levels were chosen: both heads, uniform levels, lambda 0
    "sfv_both_uniform": BOTH_UNIFORM,
}


# runs that start from another run's trained generator instead of the teacher (the start is trained first)
RUN_STARTS = {"sfv_cfg": "sfv"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the report: ``kind`` "real" | "vae" | "teacher" | "sfv", the SF-V ``run`` (RUNS) it
    samples. "vae": the held-out real clips through the teacher's VAE, the floor of every generated row."""

    name: str
    kind: str
    steps: int
    run: str | None = None
    # classifier-free guidance, SVD's 1 -> 3 over the frames. None: the sampler's own (the teacher guided, SF-V
    # not, as in the paper); False: a teacher row without it; True: an SF-V row with it (the batch doubled)
    guided: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.name}_{self.steps}" if self.kind not in ("real", "vae") else self.name


def all_rows() -> list[Row]:
    rows = [Row("real", "real", 0), Row("vae", "vae", 0)]
    rows += [Row("teacher", "teacher", s) for s in TEACHER_STEPS]
    rows += [Row("teacher_unguided", "teacher", s, guided=False) for s in UNGUIDED_STEPS]
    rows += [Row("sfv", "sfv", s, "sfv") for s in SFV_STEPS]
    rows += [Row("sfv_guided", "sfv", 1, "sfv", guided=True)]  # the toy default's generator, guided
    rows += [Row(name, "sfv", 1, name) for name in RUNS if name != "sfv"]
    return rows


def select_rows(names: Sequence[str] | None) -> list[Row]:
    """The rows whose name (or key, e.g. ``teacher_25``) is in ``names``, in report order; None: all.
    Unknown names raise ValueError listing the known ones."""
    rows = all_rows()
    if not names:
        return rows
    known = {r.name for r in rows} | {r.key for r in rows}
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"unknown row(s) {unknown}; known: {sorted({r.name for r in rows})} (or name_steps)")
    return [r for r in rows if r.name in names or r.key in names]


def reference_clips(seed: int, n: int, *, held_out: bool = False) -> np.ndarray:
    """uint8 [n, FRAMES, SIZE, SIZE, 3]: the reference clips (``held_out``: the second, independent set)."""
    base = (HELD_OUT_SEED if held_out else REFERENCE_SEED) + seed
    return np.stack([synthetic_clip(base, i, FRAMES, SIZE, SIZE, TOY_DETAIL, TOY_MEAN_COLOUR) for i in range(n)])


def noise_seeds(seed: int, n: int) -> list[int]:
    return [seed * 1_000_003 + i for i in range(n)]


def generate(pipe: Any, row: Row, images: np.ndarray, seeds: Sequence[int], batch: int = 8) -> np.ndarray:
    """uint8 [n, FRAMES, SIZE, SIZE, 3]: the row's videos from ``images`` [n, SIZE, SIZE, 3]."""
    settings = GenerationSettings(
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=row.steps,
        fps=FPS,
        sampler="svd" if row.kind == "teacher" else "sfv",  # the teacher with SVD's guidance 1 -> 3
        max_guidance_scale=1.0 if row.guided is False else GenerationSettings.max_guidance_scale,  # 1 -> 1: off
        sfv_guidance=bool(row.guided),
    )
    out = []
    for i in range(0, len(images), batch):
        frames = pipe.generate(list(images[i : i + batch]), list(seeds[i : i + batch]), settings)
        out.extend(video_io.to_uint8(v) for v in frames)
    return np.stack(out)


def reconstruct(pipe: Any, videos: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 videos -> the same through ``pipe``'s VAE (each frame encoded to its posterior mean, the clip
    decoded by the temporal decoder), as every generated row's frames are decoded."""
    one = jax.jit(lambda params, x: pipe.vae.apply({"params": params}, x))  # [b, F, H, W, 3] in [-1, 1]

    out = []
    for i in range(0, len(videos), batch):
        x = jnp.asarray(videos[i : i + batch], jnp.float32) / 127.5 - 1.0
        out.extend(video_io.to_uint8((np.asarray(v) + 1.0) / 2.0) for v in one(pipe.vae_params, x))
    return np.stack(out)


def row_metrics(videos: np.ndarray, real: np.ndarray, features: I3DFeatures, real_stats: FeatureStats) -> dict:
    """FVD against the reference statistics, and the cheap metrics against the reference clips: motion and
    sharpness as ratios to the real clips' (1 = real), the last frame's colourfulness as a ratio too (below 1:
    greyish), frame-0 PSNR against the conditioning frames."""
    stats = FeatureStats.of(features(videos))
    return {
        "fvd": fvd_from_stats(stats, real_stats),
        "motion": video_metrics.motion(videos) / video_metrics.motion(real),
        "sharpness": video_metrics.sharpness(videos) / video_metrics.sharpness(real),
        "colour": video_metrics.colourfulness(videos) / video_metrics.colourfulness(real),
        "frame0_psnr": min(video_metrics.frame0_fidelity(videos, real[:, 0]), 100.0),
    }
