"""The SF-V trainer, top to bottom: config check -> logging -> data -> models -> steps -> restore -> loop.

``train(config, workdir)`` is what ``python -m sfv_jax.main --config configs/NAME.py --workdir DIR`` runs.
The workdir gets
  ``checkpoints/<step>/``      orbax: generator, EMA, discriminator heads, both optimizer states, step,
                               RNG key, skipped-update count (``state``) and the data position (``meta``);
                               saved asynchronously, the last ``keep_checkpoints`` kept; a run started on
                               a workdir that has checkpoints resumes from the latest one.
  ``events.out.tfevents.*``    TensorBoard scalars (clu): losses, gradient norms, steps/s, skipped updates.
  ``samples/step_XXXXXXX.mp4`` one-step SF-V samples of the EMA generator on a fixed conditioning frame.
  ``config.json``              the run's config (what ``python -m sfv_jax.export`` reads).
  ``train_summary.json``       final step, wall time, first step (compilation) time, steps/s after it
                               (samples and checkpoints included), last metrics.
SIGTERM or Ctrl-C: the current step finishes, a checkpoint is written, ``train`` returns.
A non-finite loss or gradient skips the update (``opt.nonfinite="skip"``) or checkpoints the last
finite state and raises ``FloatingPointError`` (``"halt"``; a resumed run continues after that batch).

Single device for now; sharded meshes belong to the sharding issue, real video datasets to the data issue.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sfv_jax import losses, pretrained, train_steps, video_io
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.synthetic import motion_bucket, synthetic_clip
from sfv_jax.models.discriminator import HEAD_KINDS, DiscriminatorHeads, backbone_param_subset
from sfv_jax.models.unet import init_inputs
from sfv_jax.pipeline import SVDPipeline

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_KINDS = ("synthetic",)
_SAMPLE_SEED = 10_000_019  # synthetic dataset seed offset of the fixed sample-conditioning clip


class ConfigError(ValueError):
    """A training config the trainer cannot run (the message names the ``--config.`` flag)."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject settings the trainer cannot run, naming the ``--config.`` flag."""
    def need(ok: bool, flag: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--config.{flag}={config_get(config, flag)!r}: {msg}")

    for flag in ("total_steps", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints",
                 "data.micro_batch", "data.accum_steps", "data.num_frames"):
        need(config_get(config, flag) >= 1, flag, "must be >= 1")
    need(config.sample_every_steps >= 0, "sample_every_steps", "must be >= 0 (0: no samples)")
    need(config.model.dtype in DTYPES, "model.dtype", f"must be one of {tuple(DTYPES)}")
    need(config.data.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS} (real video datasets: data issue)")
    need(config.disc.heads in HEAD_KINDS, "disc.heads", f"must be one of {HEAD_KINDS}")
    need(config.loss.r1_type in losses.R1_TYPES, "loss.r1_type", f"must be one of {losses.R1_TYPES}")
    need(config.opt.nonfinite in train_steps.NONFINITE_POLICIES, "opt.nonfinite",
         f"must be one of {train_steps.NONFINITE_POLICIES}")


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar leaves as ``{"loss.r1_gamma": 1e-05, ...}`` (model dicts and None left out)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                if not prefix.startswith("model"):
                    walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[prefix + k] = v
    walk(config.to_dict(), "")
    return out


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and returns at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("signal %d received: checkpointing and stopping after this step", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- pieces

def build_models(config: ml_collections.ConfigDict, key: jax.Array):
    """(unet, unet_params, vae, vae_params, image_encoder, clip_params): from ``init_from`` (an SVD folder,
    diffusers or converted) or randomly initialised from the configs in ``config.model``."""
    dtype = DTYPES[config.model.dtype]
    if config.init_from:
        pipe = pretrained.load_pipeline(config.init_from, dtype)
        unet = pipe.unet.clone(remat_policy=config.model.remat_policy)
        return unet, pipe.unet_params, pipe.vae, pipe.vae_params, pipe.image_encoder, pipe.image_encoder_params
    for name in ("unet", "vae", "image_encoder"):
        if config.model[name] is None:
            raise ConfigError(f"--config.init_from is not set and config.model.{name} is None: give an SVD folder "
                             f"(diffusers or converted) or model config dicts for a random init")
    k1, k2, k3 = jax.random.split(key, 3)
    unet = pretrained.unet_from_config(config.model.unet.to_dict(), dtype=dtype, remat_policy=config.model.remat_policy)
    vae = pretrained.vae_from_config(config.model.vae.to_dict(), dtype=dtype)
    clip = pretrained.image_encoder_from_config(config.model.image_encoder.to_dict(), dtype=dtype)

    def init(model, k):
        return nn.meta.unbox(jax.jit(lambda k: model.init(k, *pretrained.init_args(model)))(k)["params"])

    return unet, init(unet, k1), vae, init(vae, k2), clip, init(clip, k3)


def build_heads(config: ml_collections.ConfigDict, unet: nn.Module, backbone: Any, embed_dim: int,
                latent_hw: tuple[int, int], key: jax.Array) -> tuple[DiscriminatorHeads, Any]:
    """The discriminator heads and their random init, sized from the backbone's feature shapes."""
    d = config.data
    heads = DiscriminatorHeads(config.disc.heads, config.disc.channels, config.disc.proj_dim)
    feats = jax.eval_shape(lambda p, *a: unet.apply({"params": p}, *a, method=unet.encode), backbone,
                           *init_inputs(unet.config, d.micro_batch, d.num_frames, *latent_hw))
    params = jax.jit(lambda k: heads.init(k, [jnp.zeros(f.shape, jnp.float32) for f in feats],
                                          jnp.zeros((d.micro_batch, embed_dim)), jnp.ones((d.micro_batch,))))(key)
    return heads, nn.meta.unbox(params["params"])


def make_optimizers(config: ml_collections.ConfigDict):
    """(generator, discriminator) SM3 optimizers (paper Sec. 4)."""
    o = config.opt
    return (train_steps.make_optimizer(o.generator_lr, o.b1, o.b2),
            train_steps.make_optimizer(o.discriminator_lr, o.b1, o.b2))


def step_config(config: ml_collections.ConfigDict) -> train_steps.StepConfig:
    lo = config.loss
    return train_steps.StepConfig(
        recon_weight=lo.recon_weight, huber_c=lo.huber_c, generator_grid=lo.generator_grid,
        discriminator_levels=lo.discriminator_levels, p_mean=lo.p_mean, p_std=lo.p_std, r1_type=lo.r1_type,
        r1_gamma=lo.r1_gamma, r1_alpha=lo.r1_alpha, ema_rate=config.opt.ema_rate, nonfinite=config.opt.nonfinite)


def make_batch(config: ml_collections.ConfigDict, encoder: ClipEncoder, position: int) -> dict[str, np.ndarray]:
    """The step's batch: samples ``position .. position + micro_batch * accum_steps`` of the synthetic
    dataset, encoded, reshaped to ``[accum_steps, micro_batch, ...]`` (train_steps' layout)."""
    d = config.data
    index = np.arange(position, position + d.micro_batch * d.accum_steps)
    frames = np.stack([synthetic_clip(config.seed, int(i), d.num_frames, d.height, d.width) for i in index])
    buckets = [float(d.motion_bucket_id if d.motion_bucket_id >= 0 else motion_bucket(f)) for f in frames]
    batch = encoder(frames, index, fps=d.fps, motion_bucket_ids=buckets, noise_aug_strength=d.noise_aug_strength)
    return {k: v.reshape(d.accum_steps, d.micro_batch, *v.shape[1:]) for k, v in batch.items()}


def default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def place(tree: Any) -> Any:
    """Commit a pytree to the default device: fresh and restored states then compile to the same
    executables (an uncommitted and a committed array are different jit cache entries)."""
    return jax.device_put(tree, default_sharding())


def checkpoint_manager(workdir: str | Path, config: ml_collections.ConfigDict | None = None):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints if config else None,
                                           enable_async_checkpointing=True, create=config is not None)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def restore(mngr, like: train_steps.TrainState, step: int | None = None) -> tuple[train_steps.TrainState, dict]:
    """(state, meta) of checkpoint ``step`` (default: the latest), with ``like``'s shapes, dtypes and
    shardings (arrays or ``jax.ShapeDtypeStruct``s; no sharding: the default device)."""
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint at step {step} (have {mngr.all_steps()})")
    def spec(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        return s if getattr(s, "sharding", None) is not None else jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=default_sharding())

    abstract = jax.tree.map(spec, like)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


# ---------------------------------------------------------------------------------------------- train

def train(config: ml_collections.ConfigDict, workdir: str | Path) -> train_steps.TrainState:
    import orbax.checkpoint as ocp
    from clu import metric_writers, parameter_overview, periodic_actions

    t_start = time.time()
    check_config(config)
    # ------------------------------------------------------------------ logging
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    writer.write_hparams(flat_hparams(config))
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    d = config.data
    per_step = d.micro_batch * d.accum_steps

    # ------------------------------------------------------------------ models
    key = jax.random.PRNGKey(config.seed)
    logging.info("building models (%s)", config.init_from or "random init")
    unet, unet_params, vae, vae_params, clip, clip_params = build_models(config, jax.random.fold_in(key, 1))
    unet_params, vae_params, clip_params = place((unet_params, vae_params, clip_params))
    f = vae.config.downsample_factor
    if d.height % f or d.width % f or (d.height // f) % 2 ** (len(unet.config.block_out_channels) - 1):
        raise ConfigError(f"--config.data.height/width={d.height}x{d.width}: must be multiples of "
                         f"{f * 2 ** (len(unet.config.block_out_channels) - 1)} for this VAE and UNet")
    backbone = place(backbone_param_subset(unet_params))  # frozen copy of the pretrained encoder (never updated)
    heads, head_params = build_heads(config, unet, backbone, clip.config.projection_dim,
                                     (d.height // f, d.width // f), jax.random.fold_in(key, 2))
    parameter_overview.log_parameter_overview(unet_params, msg="generator (UNet)")
    parameter_overview.log_parameter_overview(head_params, msg="discriminator heads")

    # ------------------------------------------------------------------ data
    encoder = ClipEncoder(vae, vae_params, clip, clip_params, seed=config.seed)

    # ------------------------------------------------------------------ steps
    gen_tx, disc_tx = make_optimizers(config)
    steps = train_steps.JittedSteps(train_steps.Models(unet, heads), step_config(config), gen_tx, disc_tx)
    state = place(train_steps.init_state(unet_params, head_params, gen_tx, disc_tx, jax.random.fold_in(key, 3)))
    del unet_params, head_params

    # ------------------------------------------------------------------ restore
    mngr = checkpoint_manager(workdir, config)
    position = 0
    if mngr.latest_step() is not None:
        state, meta = restore(mngr, state)  # same shardings as the fresh state
        position = int(meta["data_position"])
        logging.info("resumed from %s at step %d (data position %d)", mngr.directory, int(state.step), position)

    def save(state, wait: bool = False) -> None:
        step = int(state.step)
        if mngr.latest_step() != step:
            meta = {"step": step, "data_position": position, "samples_per_step": per_step}
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if wait:
            mngr.wait_until_finished()

    # ------------------------------------------------------------------ samples
    sample_frame = synthetic_clip(config.seed + _SAMPLE_SEED, 0, d.num_frames, d.height, d.width)[0]
    sampler = SVDPipeline(unet.clone(remat_policy="none"), None, vae, vae_params, clip, clip_params)

    def write_sample(state) -> None:
        sampler.unet_params = state.ema
        frames = sampler(sample_frame, height=config.sample.height, width=config.sample.width,
                         num_frames=d.num_frames, num_inference_steps=config.sample.steps, fps=d.fps,
                         motion_bucket_id=d.motion_bucket_id if d.motion_bucket_id >= 0 else 127, noise_aug_strength=d.noise_aug_strength,
                         sampler="sfv", seed=config.seed)
        path = video_io.write_video(workdir / "samples" / f"step_{int(state.step):07d}.mp4", frames, fps=d.fps)
        logging.info("sample written to %s", path)

    # ------------------------------------------------------------------ loop
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    first = int(state.step)
    if first >= config.total_steps:
        logging.warning("checkpoint step %d >= total_steps %d: nothing to do", first, config.total_steps)
    metrics: dict[str, float] = {}
    t_loop = t_first = time.time()
    with StopRequested() as stop:
        for _ in range(first, config.total_steps):
            batch = make_batch(config, encoder, position)
            state, g_metrics = steps.generator_step(state, batch, backbone)
            state, d_metrics = steps.discriminator_step(state, batch, backbone)
            position += per_step
            metrics = {k: float(v) for k, v in {**g_metrics, **d_metrics}.items()}
            done = int(state.step)
            if done == first + 1:
                t_first = time.time()  # the first step includes compiling the steps
            report(done)
            if metrics["g_finite"] < 1 or metrics["d_finite"] < 1:
                logging.warning("step %d: non-finite loss or gradient, update skipped (%s)", done, metrics)
                if config.opt.nonfinite == "halt":
                    save(state, wait=True)
                    mngr.close()
                    raise FloatingPointError(
                        f"step {done}: non-finite loss or gradient with --config.opt.nonfinite=halt; the last "
                        f"finite parameters are checkpointed at step {done} in {mngr.directory}")
            if done % config.log_every_steps == 0 or done == config.total_steps:
                writer.write_scalars(done, {**metrics, "skipped_updates": float(state.skipped)})
            if done % config.checkpoint_every_steps == 0 or done == config.total_steps or stop.requested:
                save(state)
            if config.sample_every_steps and (done % config.sample_every_steps == 0 or done == config.total_steps):
                write_sample(state)
            if stop.requested:
                logging.warning("stopped at step %d on request; checkpoint saved in %s", done, mngr.directory)
                break
    save(state, wait=True)
    mngr.close()
    writer.flush()
    ran, t_end = int(state.step) - first, time.time()
    summary = {"step": int(state.step), "steps_this_run": ran, "wall_s": round(t_end - t_start, 2),
               "first_step_s": round(t_first - t_loop, 2) if ran else None,
               "steps_per_s": round((ran - 1) / (t_end - t_first), 3) if ran > 1 else None,
               "skipped_updates": int(state.skipped),
               "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}}
    (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logging.info("done: %s", json.dumps(summary))
    return state
