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

Sharding: ``config.mesh`` (data x fsdp x tensor) and ``config.sharding`` (logical-axis rules), see
``sfv_jax.sharding``. Parameters, EMA and optimizer states are created in their shardings; every process
loads its own rows of each global batch; only process 0 writes logs, samples and the summary; every
process writes its checkpoint shards.

Data: ``config.data.kind`` -- synthetic videos, a folder dataset, UCF-101 (TFDS) or pre-encoded latents
(:mod:`sfv_jax.data.sources`); each process loads its own rows of every step, prefetched by threads
(:mod:`sfv_jax.data.loader`); the data iterator's state (the next sample position) is in every
checkpoint's ``meta``, so a resumed run reads the same next batch.
"""

from __future__ import annotations

import dataclasses
import functools
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
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, parameter_overview, periodic_actions

from sfv_jax.checkpoint import components, pretrained
from sfv_jax.data import video_io
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.loader import Loader
from sfv_jax.data.sources import KINDS as DATA_KINDS
from sfv_jax.data.sources import ClipSource
from sfv_jax.diffusion.pipeline import SVDPipeline
from sfv_jax.models import presets
from sfv_jax.models.attention import ATTENTION_IMPLS
from sfv_jax.models.build import (
    COMPUTE_DTYPES,
    DTYPES,
    abstract_params,
    image_encoder_from_config,
    init_args,
    unet_from_config,
    vae_from_config,
)
from sfv_jax.models.unet import init_inputs
from sfv_jax.parallel import sharding
from sfv_jax.training import losses
from sfv_jax.training import steps as train_steps
from sfv_jax.training.discriminator import HEAD_KINDS, DiscriminatorHeads, backbone_param_subset, backbone_subset

# When opt.nonfinite="halt" looks at the steps' finite flags: at log steps (the host never waits for the
# device in between; a halt then names every non-finite step since the last check) or after every step.
HALT_CHECKS = ("log_steps", "every_step")


class ConfigError(ValueError):
    """A training config the trainer cannot run (the message names the ``--config.`` flag)."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject settings the trainer cannot run, naming the ``--config.`` flag."""

    def need(ok: bool, flag: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--config.{flag}={config_get(config, flag)!r}: {msg}")

    for flag in (
        "total_steps",
        "checkpoint_every_steps",
        "log_every_steps",
        "keep_checkpoints",
        "data.micro_batch",
        "data.accum_steps",
        "data.num_frames",
    ):
        need(config_get(config, flag) >= 1, flag, "must be >= 1")
    need(config.sample_every_steps >= 0, "sample_every_steps", "must be >= 0 (0: no samples)")
    need(config.model.dtype in COMPUTE_DTYPES, "model.dtype", f"must be one of {COMPUTE_DTYPES}")
    need(
        config.model.get("attention_impl") in ATTENTION_IMPLS,
        "model.attention_impl",
        f"must be one of {ATTENTION_IMPLS}",
    )
    need(
        config.model.get("attention_impl") != "cudnn" or jax.default_backend() == "gpu",
        "model.attention_impl",
        f"cuDNN attention needs an NVIDIA GPU (backend here: {jax.default_backend()}); use chunked or None",
    )
    need(config.data.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}")
    need(config.disc.heads in HEAD_KINDS, "disc.heads", f"must be one of {HEAD_KINDS}")
    need(config.loss.r1_type in losses.R1_TYPES, "loss.r1_type", f"must be one of {losses.R1_TYPES}")
    need(
        config.opt.nonfinite in train_steps.NONFINITE_POLICIES,
        "opt.nonfinite",
        f"must be one of {train_steps.NONFINITE_POLICIES}",
    )
    need(config.opt.halt_check in HALT_CHECKS, "opt.halt_check", f"must be one of {HALT_CHECKS}")


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


def build_modules(config: ml_collections.ConfigDict, *, svd_defaults: bool = False):
    """(unet, vae, image_encoder) modules, no parameters: the architectures of ``init_from``'s folder, else
    of ``config.model``; ``svd_defaults``: SVD's own when neither is given (the memory planner)."""
    dtype, remat = DTYPES[config.model.dtype], config.model.remat_policy
    if config.init_from:

        def cfg(name):
            return components.read_config(
                components.component_folder(Path(config.init_from), components.COMPONENTS[name])
            )
    elif all(config.model[n] is not None for n in ("unet", "vae", "image_encoder")):

        def cfg(name):
            return config.model[name].to_dict()
    elif svd_defaults:

        def cfg(name):
            return dict(zip(("unet", "vae", "image_encoder"), presets.PIPELINES["svd"], strict=True))[name]
    else:
        missing = [n for n in ("unet", "vae", "image_encoder") if config.model[n] is None]
        raise ConfigError(
            f"--config.init_from is not set and config.model.{missing[0]} is None: give an SVD folder "
            f"(diffusers or converted) or model config dicts for a random init"
        )
    attn = config.model.get("attention_impl")  # the UNet's (the VAE encodes in fp32: JAX's choice there)
    return (
        unet_from_config(cfg("unet"), dtype=dtype, remat_policy=remat, attention_impl=attn),
        vae_from_config(cfg("vae"), dtype=dtype),
        image_encoder_from_config(cfg("image_encoder"), dtype=dtype),
    )


@dataclasses.dataclass
class Layout:
    """Everything about a run's arrays but the arrays: modules, optimizers and the shardings (on
    ``plan``'s mesh) of the parameters, the frozen backbone, the train state and the batch."""

    plan: sharding.Plan
    unet: nn.Module
    vae: nn.Module
    clip: nn.Module
    heads: DiscriminatorHeads
    gen_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    unet_shardings: Any
    head_shardings: Any
    backbone_shardings: Any
    state_shardings: train_steps.TrainState
    abstract_state: train_steps.TrainState  # ShapeDtypeStructs
    global_micro: int  # samples per accumulation step, over all devices

    def step_shardings(self) -> train_steps.StepShardings:
        return train_steps.StepShardings(
            self.state_shardings, self.backbone_shardings, self.plan.batch_sharding(1), self.plan.replicated
        )

    def steps(self, config: ml_collections.ConfigDict) -> train_steps.JittedSteps:
        return train_steps.JittedSteps(
            train_steps.Models(self.unet, self.heads),
            train_steps.StepConfig.from_config(config),
            self.gen_tx,
            self.disc_tx,
            self.step_shardings(),
            self.plan.context,
        )

    def abstract_batch(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes, dtypes and sharding of a step's batch (train_steps' ``[k, m, ...]`` layout)."""
        d, f = config.data, self.vae.config.downsample_factor
        k, m, h, w = d.accum_steps, self.global_micro, d.height // f, d.width // f
        c = self.vae.config.latent_channels
        shapes = {
            "latents": (k, m, d.num_frames, h, w, c),
            "image_latents": (k, m, h, w, c),
            "image_embeds": (k, m, self.clip.config.projection_dim),
            "added_time_ids": (k, m, 3),
            "index": (k, m),
        }
        sh = self.plan.batch_sharding(1)
        return {
            n: jax.ShapeDtypeStruct(s, jnp.int32 if n == "index" else jnp.float32, sharding=sh)
            for n, s in shapes.items()
        }


def make_layout(
    config: ml_collections.ConfigDict, plan: sharding.Plan, unet: nn.Module, vae: nn.Module, clip: nn.Module
) -> Layout:
    """Shardings from the modules' logical axis names and ``plan``'s rules (``jax.eval_shape`` only)."""
    d, f = config.data, vae.config.downsample_factor
    down = f * 2 ** (len(unet.config.block_out_channels) - 1)
    if d.height % down or d.width % down:
        raise ConfigError(
            f"--config.data.height/width={d.height}x{d.width}: must be multiples of {down} for this VAE and UNet"
        )
    boxed = abstract_params(unet, boxed=True)
    unet_abs, unet_sh = nn.meta.unbox(boxed), plan.param_shardings(boxed)
    heads = DiscriminatorHeads(config.disc.heads, config.disc.channels, config.disc.proj_dim)
    head_boxed = jax.eval_shape(
        functools.partial(
            _init_heads, heads, unet, embed_dim=clip.config.projection_dim, latent_hw=(d.height // f, d.width // f)
        ),
        backbone_subset(unet_abs),
        jax.random.PRNGKey(0),
    )
    head_abs, head_sh = nn.meta.unbox(head_boxed), plan.param_shardings(head_boxed)
    gen_tx, disc_tx = make_optimizers(config)
    abstract = jax.eval_shape(
        functools.partial(train_steps.init_state, gen_tx=gen_tx, disc_tx=disc_tx),
        unet_abs,
        head_abs,
        rng=jax.random.PRNGKey(0),
    )
    rep = plan.replicated
    state_sh = train_steps.TrainState(
        step=rep,
        generator=unet_sh,
        ema=unet_sh,
        heads=head_sh,
        gen_opt=plan.like_params(abstract.gen_opt, unet_abs, unet_sh),
        disc_opt=plan.like_params(abstract.disc_opt, head_abs, head_sh),
        rng=rep,
        skipped=rep,
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Layout(
        plan,
        unet,
        vae,
        clip,
        heads,
        gen_tx,
        disc_tx,
        unet_sh,
        head_sh,
        backbone_subset(unet_sh),
        state_sh,
        abstract,
        d.micro_batch * plan.batch_shards,
    )


def _init_heads(
    heads: DiscriminatorHeads,
    unet: nn.Module,
    backbone: Any,
    key: jax.Array,
    *,
    embed_dim: int,
    latent_hw: tuple[int, int],
    batch: int = 1,
) -> Any:
    """The heads' boxed random init, sized from the backbone's feature shapes."""
    feats = jax.eval_shape(
        lambda p, *a: unet.apply({"params": p}, *a, method=unet.encode),
        backbone,
        *init_inputs(unet.config, batch, unet.config.num_frames, *latent_hw),
    )
    return heads.init(
        key, [jnp.zeros(f.shape, jnp.float32) for f in feats], jnp.zeros((batch, embed_dim)), jnp.ones((batch,))
    )["params"]


def _random_init(model: nn.Module, key: jax.Array, out: Any) -> Any:
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, *init_args(model))["params"]), out_shardings=out)(key)


def frozen_encoders(config: ml_collections.ConfigDict, vae: nn.Module, clip: nn.Module, key: jax.Array):
    """(vae_params, image_encoder_params) on this process's first device: ``init_from``'s weights, else
    the random init of :func:`init_params` (the same keys, so the trainer and the latent encoder agree)."""
    local = jax.local_devices()[0]
    if config.init_from:
        dtype = DTYPES[config.model.dtype]
        vae_params = pretrained.load_vae(config.init_from, dtype)[1]
        clip_params = pretrained.load_image_encoder(config.init_from, dtype)[1]
        return jax.device_put((vae_params, clip_params), local)
    _, k_vae, k_clip = jax.random.split(jax.random.fold_in(key, 1), 3)
    one = jax.sharding.SingleDeviceSharding(local)
    return _random_init(vae, k_vae, one), _random_init(clip, k_clip, one)


def init_params(config: ml_collections.ConfigDict, lay: Layout, key: jax.Array):
    """(unet_params, vae_params, clip_params, head_params, backbone): the UNet, heads and backbone
    created directly in their shardings (jitted init with ``out_shardings``; no full host copy for a
    random init), the frozen VAE and image encoder on this process's first device (they encode the
    process's own samples). ``init_from``: weights from the SVD folder, placed leaf by leaf."""
    k_unet = jax.random.split(jax.random.fold_in(key, 1), 3)[0]
    if config.init_from:
        components.check_pipeline_folder(Path(config.init_from))
        _, params = pretrained.load_unet(config.init_from, DTYPES[config.model.dtype])
        unet_params = jax.device_put(jax.tree.map(np.asarray, params), lay.unet_shardings)
        del params
    else:
        unet_params = _random_init(lay.unet, k_unet, lay.unet_shardings)
    vae_params, clip_params = frozen_encoders(config, lay.vae, lay.clip, key)
    d, f = config.data, lay.vae.config.downsample_factor
    head_params = jax.jit(
        lambda k: nn.meta.unbox(
            _init_heads(
                lay.heads,
                lay.unet,
                backbone_subset(unet_params),
                k,
                embed_dim=lay.clip.config.projection_dim,
                latent_hw=(d.height // f, d.width // f),
            )
        ),
        out_shardings=lay.head_shardings,
    )(jax.random.fold_in(key, 2))
    backbone = jax.jit(backbone_param_subset, out_shardings=lay.backbone_shardings)(unet_params)
    return unet_params, vae_params, clip_params, head_params, backbone


def init_train_state(lay: Layout, unet_params: Any, head_params: Any, rng: jax.Array) -> train_steps.TrainState:
    """The fresh train state (EMA = generator copy, zero optimizer states) in ``lay.state_shardings``."""
    fn = functools.partial(train_steps.init_state, gen_tx=lay.gen_tx, disc_tx=lay.disc_tx)
    return jax.jit(fn, out_shardings=lay.state_shardings)(unet_params, head_params, rng=rng)


def make_optimizers(config: ml_collections.ConfigDict):
    """(generator, discriminator) SM3 optimizers (paper Sec. 4)."""
    o = config.opt
    return (
        train_steps.make_optimizer(o.generator_lr, o.b1, o.b2),
        train_steps.make_optimizer(o.discriminator_lr, o.b1, o.b2),
    )


def make_batch(
    config: ml_collections.ConfigDict,
    encoder: ClipEncoder,
    position: int,
    global_micro: int | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """This process's part of the step's batch (no prefetching; see :class:`sfv_jax.data.loader.Loader`):
    the step holds samples ``position .. position + k * m`` (k = ``accum_steps``, m = ``global_micro``,
    default ``micro_batch``) in train_steps' ``[k, m, ...]`` layout, sample ``position + i * m + r`` at
    ``[i, r]``; ``rows`` (default all) are the r this process loads (``Plan.local_rows``). Numpy."""
    return Loader(config, encoder, global_micro=global_micro, rows=rows).batch(position)


def default_sharding() -> jax.sharding.Sharding:
    """Where a restore puts arrays whose target has no sharding: this process's first device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def checkpoint_manager(workdir: str | Path, config: ml_collections.ConfigDict | None = None):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config else None,
        enable_async_checkpointing=True,
        create=config is not None,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def restore(mngr, like: train_steps.TrainState, step: int | None = None) -> tuple[train_steps.TrainState, dict]:
    """(state, meta) of checkpoint ``step`` (default: the latest), with ``like``'s shapes, dtypes and
    shardings (arrays or ``jax.ShapeDtypeStruct``s; no sharding: the default device)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint at step {step} (have {mngr.all_steps()})")

    def spec(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        return (
            s
            if getattr(s, "sharding", None) is not None
            else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=default_sharding())
        )

    abstract = jax.tree.map(spec, like)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], out["meta"]


# ---------------------------------------------------------------------------------------------- train


def describe_params(name: str, params: Any) -> str:
    """One console line: ``generator (UNet): 1,524,623,082 parameters, 6.10 GB (float32)``."""
    leaves = jax.tree.leaves(params)
    count = sum(int(np.prod(x.shape)) for x in leaves)
    size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    dtypes = ", ".join(sorted({str(np.dtype(x.dtype)) for x in leaves}))
    return f"{name}: {count:,} parameters, {size / 1e9:.3g} GB ({dtypes}), {len(leaves)} tensors"


# the metrics of a log line, in this order (the rest follow); TensorBoard gets all of them
_LOG_ORDER = ("g_loss", "g_adv", "g_recon", "d_loss", "d_hinge", "d_r1", "g_grad_norm", "d_grad_norm")


def format_metrics(step: int, total: int, metrics: dict[str, float], steps_per_s: float | None) -> str:
    """``step 10/400  g_loss 0.1234  g_adv 1.002 ...  2.85 steps/s`` (the finite flags left out)."""
    keys = [k for k in _LOG_ORDER if k in metrics] + sorted(
        k for k in metrics if k not in _LOG_ORDER and not k.endswith("_finite")
    )
    rate = f"  {steps_per_s:.3g} steps/s" if steps_per_s else ""
    return f"step {step}/{total}  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in keys) + rate


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, verbose_tables: bool = False
) -> train_steps.TrainState:
    """Train (or resume) the run in ``workdir``; returns the final state. ``verbose_tables``: also log
    the per-parameter tables (they are always written to ``workdir/parameters.txt``).

    The host runs ahead of the device: metrics stay on the device until a log step (``log_every_steps``),
    the step counter is kept on the host, and only log, checkpoint and sample steps wait for the device.
    A non-finite loss or gradient is handled on the device (the update is skipped, ``skipped`` counts it);
    the host looks at the steps' finite flags at log steps (``opt.halt_check="log_steps"``, the default)
    or after every step (``"every_step"``), warns, and with ``opt.nonfinite="halt"`` checkpoints and stops.
    """
    t_start = time.time()
    check_config(config)
    halt_every_step = config.opt.halt_check == "every_step"
    # ------------------------------------------------------------------ logging
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    # TensorBoard events only (process 0); the console gets one readable line per log step (below)
    writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(workdir))] if lead else [])
    writer.write_hparams(flat_hparams(config))
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    d = config.data

    # ------------------------------------------------------------------ dataset (opened first: a bad path fails fast)
    source = ClipSource(config)
    logging.info("data: %s%s", d.kind, f", {len(source)} records" if len(source) else "")

    # ------------------------------------------------------------------ mesh
    plan = sharding.Plan.from_config(config)
    logging.info("mesh %s, process %d of %d", plan.describe(), jax.process_index(), jax.process_count())

    # ------------------------------------------------------------------ models and shardings
    key = jax.random.PRNGKey(config.seed)
    lay = make_layout(config, plan, *build_modules(config))
    per_step = lay.global_micro * d.accum_steps
    logging.info(
        "building models (%s); %d samples per step (%d per device x %d batch shards x %d accumulation)",
        config.init_from or "random init",
        per_step,
        d.micro_batch,
        plan.batch_shards,
        d.accum_steps,
    )
    unet_params, vae_params, clip_params, head_params, backbone = init_params(config, lay, key)
    tables = []
    for name, params in (
        ("generator (UNet)", unet_params),
        ("discriminator heads", head_params),
        ("VAE (frozen)", vae_params),
        ("image encoder (frozen)", clip_params),
    ):
        logging.info("%s", describe_params(name, params))
        tables.append(f"{describe_params(name, params)}\n{parameter_overview.get_parameter_overview(params)}\n")
    if lead:
        (workdir / "parameters.txt").write_text("\n".join(tables))
    if verbose_tables:
        logging.info("parameters:\n%s", "\n".join(tables))

    # ------------------------------------------------------------------ data
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    rows = plan.local_rows(lay.global_micro)  # the samples of each accumulation step this process loads
    loader = Loader(config, encoder, global_micro=lay.global_micro, rows=rows, source=source)

    # ------------------------------------------------------------------ steps and state
    steps = lay.steps(config)
    state = init_train_state(lay, unet_params, head_params, jax.random.fold_in(key, 3))
    del unet_params, head_params

    # ------------------------------------------------------------------ restore
    mngr = checkpoint_manager(workdir, config)
    position, data_state = 0, None
    if mngr.latest_step() is not None:
        state, meta = restore(mngr, state)  # into the shardings of the fresh state (any mesh saved it)
        position, data_state = int(meta["data_position"]), meta.get("data_iterator")
        logging.info("resumed from %s at step %d (data position %d)", mngr.directory, int(state.step), position)
    first = int(state.step)  # from here on the host counts the steps: no wait for the device
    todo = max(0, config.total_steps - first)
    batches = loader.iterator_from_state(data_state, todo) if data_state else loader.iterator(position, todo)

    def save(state, step: int, wait: bool = False) -> None:
        if mngr.latest_step() != step:
            meta = {
                "step": step,
                "data_position": position,
                "samples_per_step": per_step,
                "data_iterator": batches.get_state(),
            }
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if wait:
            mngr.wait_until_finished()

    # ------------------------------------------------------------------ samples
    sample_frame = source.sample_frame()
    sampler = SVDPipeline(lay.unet.clone(remat_policy="none"), None, lay.vae, vae_params, lay.clip, clip_params)
    gather = jax.jit(lambda t: t, out_shardings=plan.replicated)

    def write_sample(state, step: int) -> None:
        # one device: the EMA as it is. A mesh: the EMA is gathered and every process samples on its first
        # device alone, like the pipeline's other inputs (same result everywhere; process 0 writes)
        sampler.unet_params = (
            state.ema
            if plan.mesh.devices.size == 1
            else jax.device_put(
                jax.tree.map(lambda x: x.addressable_data(0), gather(state.ema)), jax.local_devices()[0]
            )
        )
        frames = sampler(
            sample_frame,
            height=config.sample.height,
            width=config.sample.width,
            num_frames=d.num_frames,
            num_inference_steps=config.sample.steps,
            fps=d.fps,
            motion_bucket_id=d.motion_bucket_id if d.motion_bucket_id >= 0 else 127,
            noise_aug_strength=d.noise_aug_strength,
            sampler="sfv",
            seed=config.seed,
        )
        if lead:
            path = video_io.write_video(workdir / "samples" / f"step_{step:07d}.mp4", frames, fps=d.fps)
            logging.info("sample written to %s", path)

    # ------------------------------------------------------------------ loop
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    if first >= config.total_steps:
        logging.warning("checkpoint step %d >= total_steps %d: nothing to do", first, config.total_steps)
    metrics: dict[str, float] = {}
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet looked at by the host
    t_loop = t_first = t_log = time.time()
    step_log = first

    def check_finite(done: int) -> None:
        """Look at the pending steps' finite flags (one device -> host transfer); warn, maybe halt."""
        flags = jax.device_get([(m["g_finite"], m["d_finite"]) for _, m in pending])
        bad = [s for (s, _), (g, dd) in zip(pending, flags, strict=True) if g < 1 or dd < 1]
        if bad:
            logging.warning(
                "step%s %s: non-finite loss or gradient, update skipped",
                "s" if len(bad) > 1 else "",
                ", ".join(map(str, bad)),
            )
            if config.opt.nonfinite == "halt":
                save(state, done, wait=True)
                mngr.close()
                raise FloatingPointError(
                    f"step {bad[0]}: non-finite loss or gradient with --config.opt.nonfinite=halt (non-finite "
                    f"steps: {bad}); the update was skipped and the last finite parameters are checkpointed at "
                    f"step {done} in {mngr.directory}"
                )

    with StopRequested() as stop:
        for done in range(first + 1, config.total_steps + 1):
            batch = plan.global_batch(next(batches), lay.global_micro)
            state, g_metrics = steps.generator_step(state, batch, backbone)
            state, d_metrics = steps.discriminator_step(state, batch, backbone)
            position = batches.position
            pending.append((done, {**g_metrics, **d_metrics}))
            if done == first + 1:
                jax.block_until_ready(state.step)
                t_first = t_log = time.time()  # the first step includes compiling the steps
            report(done)
            last = done == config.total_steps
            if done % config.log_every_steps == 0 or last:
                metrics = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items()}
                check_finite(done)
                pending.clear()
                now = time.time()
                rate = (done - step_log) / (now - t_log) if done > first + 1 and now > t_log else None
                t_log, step_log = now, done
                writer.write_scalars(
                    done,
                    {
                        **metrics,
                        "skipped_updates": float(state.skipped),
                        "data_short_records_replaced": float(source.too_short),
                    },
                )
                logging.info("%s", format_metrics(done, config.total_steps, metrics, rate))
            elif halt_every_step:
                check_finite(done)
                pending.clear()
            if done % config.checkpoint_every_steps == 0 or last or stop.requested:
                save(state, done)
            if config.sample_every_steps and (done % config.sample_every_steps == 0 or last):
                write_sample(state, done)
            if stop.requested:
                logging.warning("stopped at step %d on request; checkpoint saved in %s", done, mngr.directory)
                break
    if pending:  # a stop between log steps: its steps' metrics and finite flags
        metrics = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items()}
        check_finite(int(pending[-1][0]))
    save(state, int(state.step), wait=True)
    mngr.close()
    writer.flush()
    ran, t_end = int(state.step) - first, time.time()
    summary = {
        "step": int(state.step),
        "steps_this_run": ran,
        "wall_s": round(t_end - t_start, 2),
        "first_step_s": round(t_first - t_loop, 2) if ran else None,
        "steps_per_s": round((ran - 1) / (t_end - t_first), 3) if ran > 1 else None,
        "skipped_updates": int(state.skipped),
        "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
    }
    if lead:
        (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logging.info("done: %s", json.dumps(summary))
    return state
