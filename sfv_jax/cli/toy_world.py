"""Build the toy world's starting pipeline: train the toy VAE on the synthetic moving-shapes clips, measure
its latent scaling factor and held-out PSNR, and write a pipeline folder (the format ``convert`` writes)
with that VAE, a fixed random image encoder and a random UNet. The toy teacher is then trained from it
with the diffusion objective (``configs/toy_teacher.py``).

    python -m sfv_jax.cli.toy_world --workdir runs/toy_vae --out runs/toy_init [--steps 1500] [--seed 0]

The VAE is SVD's architecture (``models.presets.VAES["toy32"]``: 3 levels of 64 / 64 / 128 channels,
32x32 frames -> 8x8x4 latents, temporal decoder) trained by ``training.vae_objective`` (squared error +
1e-6 KL, SD's weight) with AdamW (warm-up, cosine decay, clipping at 1) on clips of ``--frames`` frames; its
``scaling_factor`` is set to 1 / std of the posterior means on the training clips, so that the scaled
latents have unit std as every SVD noise level assumes. The image
encoder is the toy CLIP preset with fixed random weights (seed ``--seed``): a random projection of the
conditioning image is conditioning enough for the toy world; training it would need a second objective.
Resumable: the VAE's state is saved in ``--workdir`` every ``--save-every`` steps; a rerun continues.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization

from sfv_jax import console
from sfv_jax.checkpoint import components, convert
from sfv_jax.console import fail
from sfv_jax.data import video_metrics
from sfv_jax.data.synthetic import TOY_DETAIL, TOY_MEAN_COLOUR, synthetic_clip
from sfv_jax.models import build, presets
from sfv_jax.models.build import DTYPES
from sfv_jax.paths import folder_problem, output_overlaps, write_atomic
from sfv_jax.training import vae_objective

HELD_OUT_SEED = 1_000_003  # the synthetic dataset seed of the held-out clips (training uses --data-seed)
STATE_FILE = "vae_state.msgpack"


def clips(seed: int, start: int, n: int, frames: int, size: int) -> np.ndarray:
    """The toy world's synthetic clips start..start+n-1 of dataset ``seed``: uint8 [n, frames, size, size, 3]."""
    return np.stack(
        [synthetic_clip(seed, i, frames, size, size, TOY_DETAIL, TOY_MEAN_COLOUR) for i in range(start, start + n)]
    )


def to_model(video: np.ndarray) -> jax.Array:
    return jnp.asarray(video, jnp.float32) / 127.5 - 1.0


def to_uint8(video: jax.Array) -> np.ndarray:
    return np.asarray(jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def _save_state(workdir: Path, state: dict) -> None:
    data = serialization.to_bytes(jax.tree.map(np.asarray, state))
    write_atomic(workdir / STATE_FILE, lambda p: p.write_bytes(data))


def _log(message: str) -> None:
    print(message, flush=True)


def train_vae(args: argparse.Namespace, log=_log) -> tuple[dict, dict, dict]:
    """(vae config dict with the measured scaling_factor, params, report) after ``args.steps`` steps."""
    cfg = dict(presets.VAES["toy32"])
    vae = build.vae_from_config(cfg)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 2), args.steps, args.lr * 0.05),
            weight_decay=0.0,
        ),
    )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params = nn.meta.unbox(vae.init(jax.random.PRNGKey(args.seed), *build.init_args(vae))["params"])
    state = {"step": np.int64(0), "params": params, "opt": tx.init(params)}
    if (workdir / STATE_FILE).is_file():
        state = serialization.from_bytes(state, (workdir / STATE_FILE).read_bytes())
        log(f"resumed the VAE at step {int(state['step'])} from {workdir / STATE_FILE}")

    @jax.jit
    def step(params, opt, video, key):
        (loss, m), grads = jax.value_and_grad(vae_objective.vae_loss, argnums=1, has_aux=True)(
            vae, params, video, key, kl_weight=args.kl_weight
        )
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, {"loss": loss, **m}

    params, opt = state["params"], state["opt"]
    t0, start = time.time(), int(state["step"])
    for s in range(start, args.steps):
        video = to_model(clips(args.data_seed, s * args.batch, args.batch, args.frames, args.size))
        params, opt, m = step(params, opt, video, jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), s))
        if (s + 1) % args.log_every == 0 or s + 1 == args.steps:
            rate = (s + 1 - start) / (time.time() - t0)
            log(
                f"vae step {s + 1}/{args.steps}: loss {float(m['loss']):.5f} mse {float(m['mse']):.5f} "
                f"kl {float(m['kl']):.3f} ({rate:.2f} steps/s)"
            )
        if (s + 1) % args.save_every == 0 and s + 1 < args.steps:
            _save_state(workdir, {"step": np.int64(s + 1), "params": params, "opt": opt})
    _save_state(workdir, {"step": np.int64(args.steps), "params": params, "opt": opt})

    # what is shipped is measured: the weights as stored (--dtype), read back as float32
    params = jax.tree.map(lambda x: jnp.asarray(x).astype(DTYPES[args.dtype]).astype(jnp.float32), params)
    recon_fn = jax.jit(lambda p, v: vae_objective.reconstruct(vae, p, v))
    std_fn = jax.jit(lambda p, v: vae_objective.latent_std(vae, p, v))
    train_clips = clips(args.data_seed, 0, args.eval_clips, args.frames, args.size)
    stds = [float(std_fn(params, to_model(train_clips[i : i + 4]))) for i in range(0, len(train_clips), 4)]
    cfg["scaling_factor"] = float(1.0 / np.sqrt(np.mean(np.square(stds))))
    held = clips(HELD_OUT_SEED, 0, args.eval_clips, args.frames, args.size)
    recon = np.concatenate([to_uint8(recon_fn(params, to_model(held[i : i + 4]))) for i in range(0, len(held), 4)])
    report = {
        "steps": args.steps,
        "scaling_factor": cfg["scaling_factor"],
        "held_out_psnr_db": video_metrics.psnr(recon, held),
        "held_out_clips": int(len(held)),
        "held_out_sharpness_ratio": video_metrics.sharpness(recon) / video_metrics.sharpness(held),
    }
    log(
        f"VAE: scaling_factor {report['scaling_factor']:.4f}, held-out PSNR {report['held_out_psnr_db']:.2f} dB "
        f"({len(held)} clips), sharpness ratio {report['held_out_sharpness_ratio']:.3f}"
    )
    return cfg, params, report


def write_pipeline(
    out: Path, vae_cfg: dict, vae_params: dict, seed: int, frames: int, meta: dict, dtype: str = "float32"
) -> Path:
    """The pipeline folder: the trained VAE, the fixed random toy image encoder and a random toy UNet, each
    stored in ``dtype``."""
    unet_cfg = {**presets.UNETS["toy32"], "num_frames": frames}
    clip_cfg = dict(presets.IMAGE_ENCODERS["toy"])
    unet, clip = build.unet_from_config(unet_cfg), build.image_encoder_from_config(clip_cfg)
    k_unet, k_clip = jax.random.split(jax.random.PRNGKey(seed))
    parts = {
        name: (nn.meta.unbox(model.init(key, *build.init_args(model))["params"]), cfg, f"random init, seed {seed}")
        for name, model, key, cfg in (("unet", unet, k_unet, unet_cfg), ("image_encoder", clip, k_clip, clip_cfg))
    }
    parts["vae"] = (vae_params, vae_cfg, meta["command"])
    pipeline_meta = {"format": components.FORMAT, "version": components.FORMAT_VERSION, "component": "pipeline"}
    return convert.save_converted_pipeline(out, parts, {**pipeline_meta, **meta}, dtype=DTYPES[dtype])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="the VAE's training state (resumable)")
    p.add_argument("--out", required=True, help="the pipeline folder to write (must not exist)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=2, help="clips per step")
    p.add_argument("--frames", type=int, default=7, help="frames per training clip (the decoder mixes 3 at a time)")
    p.add_argument("--unet-frames", type=int, default=14, help="the random UNet's num_frames (the videos' length)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight per latent element (SD's VAE: 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="the stored weights' dtype (bfloat16: the shipped toy teacher fits its 20 MB); the VAE's scaling "
        "factor and PSNR are measured with the weights as stored",
    )
    p.add_argument("--data-seed", type=int, default=0, help="the synthetic dataset's seed (the trainer's data.seed)")
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=250)
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    if out.exists():
        return fail(f"--out {out}: exists; pass a new folder")
    if problem := output_overlaps("--out", out, {"--workdir": Path(args.workdir)}) or folder_problem(
        "--workdir", args.workdir
    ):
        return fail(problem)
    for flag in ("steps", "batch", "frames", "unet_frames", "size", "eval_clips", "log_every", "save_every"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")
    t0 = time.time()
    vae_cfg, vae_params, report = train_vae(args)
    command = "python -m sfv_jax.cli.toy_world " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "seed": args.seed, "vae": report, "wall_time_s": round(time.time() - t0, 1)}
    write_pipeline(out, vae_cfg, vae_params, args.seed, args.unet_frames, meta, args.dtype)
    print(f"wrote {out} ({meta['wall_time_s']:.0f} s)")
    return 0


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
