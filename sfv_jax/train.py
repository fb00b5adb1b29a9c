"""The SF-V trainer, top to bottom: logging -> data -> models -> steps -> restore -> loop.

``train(config, workdir)`` is what ``python -m sfv_jax.main --config configs/NAME.py --workdir DIR`` runs.
The workdir gets ``checkpoints/`` (orbax: generator, EMA, discriminator heads, optimizer states, step,
RNG and data position; asynchronous saves, the last ``keep_checkpoints`` kept, resumed automatically),
TensorBoard event files (clu), and ``samples/step_XXXXXXX.mp4`` (one-step SF-V samples of the EMA
generator). SIGTERM or Ctrl-C saves a checkpoint and returns cleanly.

Single device for now; sharded meshes are the sharding issue's.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sfv_jax import pretrained, train_steps, video_io
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.synthetic import motion_bucket, synthetic_clip
from sfv_jax.models.discriminator import DiscriminatorHeads, backbone_param_subset
from sfv_jax.models.unet import init_inputs
from sfv_jax.pipeline import SVDPipeline

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SAMPLE_SEED = 10_000_019  # synthetic dataset seed offset of the fixed sample-conditioning clip


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


def build_models(config: ml_collections.ConfigDict, key: jax.Array):
    """(unet, unet_params, vae, vae_params, image_encoder, clip_params): from ``init_from`` (an SVD folder,
    diffusers or converted) or randomly initialised from the configs in ``config.model``."""
    dtype = _DTYPES[config.model.dtype]
    if config.init_from:
        pipe = pretrained.load_pipeline(config.init_from, dtype)
        unet = pipe.unet.clone(remat_policy=config.model.remat_policy)
        return unet, pipe.unet_params, pipe.vae, pipe.vae_params, pipe.image_encoder, pipe.image_encoder_params
    for name in ("unet", "vae", "image_encoder"):
        if config.model[name] is None:
            raise ValueError(f"config: set init_from (an SVD folder) or model.{name} (a config dict for random init)")
    k1, k2, k3 = jax.random.split(key, 3)
    unet = pretrained.unet_from_config(config.model.unet.to_dict(), dtype=dtype, remat_policy=config.model.remat_policy)
    vae = pretrained.vae_from_config(config.model.vae.to_dict(), dtype=dtype)
    clip = pretrained.image_encoder_from_config(config.model.image_encoder.to_dict(), dtype=dtype)

    def init(model, k):
        return nn.meta.unbox(jax.jit(lambda k: model.init(k, *pretrained.init_args(model)))(k)["params"])

    return unet, init(unet, k1), vae, init(vae, k2), clip, init(clip, k3)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> train_steps.TrainState:
    import orbax.checkpoint as ocp
    from clu import metric_writers, parameter_overview, periodic_actions

    # ------------------------------------------------------------------ logging
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})

    # ------------------------------------------------------------------ data
    d = config.data
    per_step = d.micro_batch * d.accum_steps

    def clip_batch(position: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
        index = np.arange(position, position + per_step)
        frames = np.stack([synthetic_clip(config.seed, int(i), d.num_frames, d.height, d.width) for i in index])
        buckets = [float(d.motion_bucket_id if d.motion_bucket_id >= 0 else motion_bucket(f)) for f in frames]
        return frames, index, buckets

    # ------------------------------------------------------------------ models
    key = jax.random.PRNGKey(config.seed)
    unet, unet_params, vae, vae_params, clip, clip_params = build_models(config, jax.random.fold_in(key, 1))
    backbone = backbone_param_subset(unet_params)  # frozen copy of the pretrained encoder
    encoder = ClipEncoder(vae, vae_params, clip, clip_params, seed=config.seed)
    h, w = d.height // vae.config.downsample_factor, d.width // vae.config.downsample_factor
    heads = DiscriminatorHeads(config.disc.heads, config.disc.channels, config.disc.proj_dim)
    feats = jax.eval_shape(lambda p, *a: unet.apply({"params": p}, *a, method=unet.encode), backbone,
                           *init_inputs(unet.config, d.micro_batch, d.num_frames, h, w))
    head_params = nn.meta.unbox(jax.jit(lambda k: heads.init(
        k, [jnp.zeros(f.shape, jnp.float32) for f in feats], jnp.zeros((d.micro_batch, clip.config.projection_dim)),
        jnp.ones((d.micro_batch,))))(jax.random.fold_in(key, 2))["params"])
    parameter_overview.log_parameter_overview(unet_params, msg="generator (UNet)")
    parameter_overview.log_parameter_overview(head_params, msg="discriminator heads")

    # ------------------------------------------------------------------ steps
    models = train_steps.Models(unet, heads)
    cfg = train_steps.StepConfig(
        recon_weight=config.loss.recon_weight, huber_c=config.loss.huber_c, generator_grid=config.loss.generator_grid,
        discriminator_levels=config.loss.discriminator_levels, p_mean=config.loss.p_mean, p_std=config.loss.p_std,
        r1_type=config.loss.r1_type, r1_gamma=config.loss.r1_gamma, r1_alpha=config.loss.r1_alpha,
        ema_rate=config.opt.ema_rate, nonfinite=config.opt.nonfinite)
    gen_tx = train_steps.make_optimizer(config.opt.generator_lr, config.opt.b1, config.opt.b2)
    disc_tx = train_steps.make_optimizer(config.opt.discriminator_lr, config.opt.b1, config.opt.b2)
    steps = train_steps.JittedSteps(models, cfg, gen_tx, disc_tx)
    state = train_steps.init_state(unet_params, head_params, gen_tx, disc_tx, jax.random.fold_in(key, 3))
    del unet_params, head_params

    # ------------------------------------------------------------------ restore
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    if mngr.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        logging.info("resumed from %s at step %d (data position %d)", workdir / "checkpoints",
                     int(state.step), restored["meta"]["data_position"])

    def save(state, wait: bool = False) -> None:
        step = int(state.step)
        if mngr.latest_step() != step:
            meta = {"data_position": step * per_step, "step": step, "samples_per_step": per_step}
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if wait:
            mngr.wait_until_finished()

    # ------------------------------------------------------------------ loop
    sample_frame = synthetic_clip(config.seed + _SAMPLE_SEED, 0, d.num_frames, d.height, d.width)[0]

    def write_sample(state) -> None:
        pipe = SVDPipeline(unet.clone(remat_policy="none"), state.ema, vae, vae_params, clip, clip_params)
        frames = pipe(sample_frame, height=config.sample.height, width=config.sample.width, num_frames=d.num_frames,
                      num_inference_steps=config.sample.steps, fps=d.fps, sampler="sfv", seed=config.seed)
        path = video_io.write_video(workdir / "samples" / f"step_{int(state.step):07d}.mp4", frames, fps=d.fps)
        logging.info("sample written to %s", path)

    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    start = int(state.step)
    with StopRequested() as stop:
        for step in range(start, config.total_steps):
            frames, index, buckets = clip_batch(step * per_step)
            batch = encoder(frames, index, fps=d.fps, motion_bucket_ids=buckets, noise_aug_strength=d.noise_aug_strength)
            batch = {k: v.reshape(d.accum_steps, d.micro_batch, *v.shape[1:]) for k, v in batch.items()}
            state, g_metrics = steps.generator_step(state, batch, backbone)
            state, d_metrics = steps.discriminator_step(state, batch, backbone)
            metrics = {k: float(v) for k, v in {**g_metrics, **d_metrics}.items()}
            done = int(state.step)
            report(done)
            if metrics["g_finite"] < 1 or metrics["d_finite"] < 1:
                logging.warning("step %d: non-finite loss or gradient, update skipped (%s)", done, metrics)
                if config.opt.nonfinite == "halt":
                    save(state, wait=True)
                    raise FloatingPointError(f"step {done}: non-finite loss or gradient (opt.nonfinite='halt'); "
                                             f"the last finite state is checkpointed in {workdir / 'checkpoints'}")
            if done % config.log_every_steps == 0 or done == config.total_steps:
                writer.write_scalars(done, {**metrics, "skipped_updates": float(state.skipped)})
            if done % config.checkpoint_every_steps == 0 or done == config.total_steps or stop.requested:
                save(state)
            if config.sample_every_steps and (done % config.sample_every_steps == 0 or done == config.total_steps):
                write_sample(state)
            if stop.requested:
                logging.warning("stopped at step %d on request; checkpoint saved", done)
                break
    save(state, wait=True)
    mngr.close()
    writer.flush()
    (workdir / "train_summary.json").write_text(json.dumps({"step": int(state.step), **{
        k: v for k, v in locals().get("metrics", {}).items()}}, indent=2) + "\n")
    return state

