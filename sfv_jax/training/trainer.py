"""The trainer, top to bottom: config check -> logging -> data -> models -> steps -> restore -> loop.

One trainer for every objective (``config.objective``): ``sfv`` (SF-V's generator and discriminator
steps), ``diffusion`` (SVD's denoising loss: fine-tuning SVD, training a teacher) and ``guidance`` (a
trained generator's guided output distilled into one conditional pass); the objective is
the steps' pure loss function and the parameters it trains (``sfv_jax.training.steps``), and
``config.trainable`` picks the UNet parameters that train (``sfv_jax.training.param_groups``).

``train(config, workdir)`` is what ``python -m sfv_jax.cli.train --config configs/NAME.py --workdir DIR`` runs.
The workdir gets
  ``checkpoints/<step>/``      orbax: generator, EMA, discriminator heads, both optimizer states, the
                               frozen UNet parameters (``trainable=temporal``), step,
                               RNG key, skipped-update count (``state``) and the data position (``meta``);
                               saved asynchronously, the last ``keep_checkpoints`` kept; a run started on
                               a workdir that has checkpoints resumes from the latest one.
  ``events.out.tfevents.*``    TensorBoard scalars (clu): losses, gradient norms, the discriminator's mean real /
                               fake logits and accuracy per head kind, steps/s, skipped updates.
  ``samples/step_XXXXXXX.mp4`` samples of the EMA generator on a fixed conditioning frame: SF-V's sampler
                               (sfv) or the teacher's Euler sampler with guidance (diffusion), at
                               ``sample.steps`` steps; ``step_XXXXXXX.png`` its frame grid (the real
                               clip of that frame above it; also the TensorBoard image ``sample/frames``)
                               and the scalars ``sample/motion_ratio``, ``sharpness_ratio``, ``frame0_psnr``.
  ``config.json``              the run's config (what ``python -m sfv_jax.cli.export`` reads).
  ``train_summary.json``       final step, wall time, first step (compilation) time, steps/s after it
                               (samples and checkpoints included), last metrics.
SIGTERM or Ctrl-C: the current step finishes, a checkpoint is written, ``train`` returns; during the first
step (compiling: minutes at full size, and nothing new to save yet) they end the process at once.
One run writes a workdir at a time: a second ``train`` on it stops with an error naming the first
(:class:`sfv_jax.paths.OutputLock`, one lock per process).
A non-finite loss or gradient skips the update (``opt.nonfinite="skip"``) or checkpoints the last
finite state and raises ``FloatingPointError`` (``"halt"``; a resumed run continues after that batch).

Sharding: ``config.mesh`` (data x fsdp x tensor) and ``config.sharding`` (logical-axis rules), see
``sfv_jax.parallel.sharding``. Parameters, EMA and optimizer states are created in their shardings; every process
loads its own rows of each global batch; only process 0 writes logs, samples and the summary; every
process writes its checkpoint shards.

Data: ``config.data.kind`` -- synthetic videos, a folder dataset, UCF-101 (TFDS) or pre-encoded latents
(:mod:`sfv_jax.data.sources`); each process loads its own rows of every step, prefetched by threads
(:mod:`sfv_jax.data.loader`); the data iterator's state (the next sample position) is in every
checkpoint's ``meta``, so a resumed run reads the same next batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers, parameter_overview, periodic_actions

from sfv_jax.data import video_io, video_metrics
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.loader import Loader
from sfv_jax.data.sources import ClipSource
from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.diffusion.pipeline import SVDPipeline
from sfv_jax.parallel import sharding
from sfv_jax.paths import OutputLock, write_atomic
from sfv_jax.training import losses, objectives, param_groups
from sfv_jax.training import steps as train_steps
from sfv_jax.training.checkpoints import checkpoint_manager, restore_newest_readable
from sfv_jax.training.heldout import HeldOutGrip
from sfv_jax.training.layout import build_modules, init_params, init_train_state, make_layout
from sfv_jax.training.run_config import check_config, check_workdir, flat_hparams


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

    @contextlib.contextmanager
    def at_once(self):
        """Inside: SIGTERM and SIGINT end the process at once (the system's default action). For the
        first step: its compilation runs in XLA, where no Python handler runs until it returns (minutes at
        full size, past a cluster's kill grace period), and there is nothing new to checkpoint yet."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)


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


def write_sample_diagnostics(writer, workdir: Path, step: int, sample: np.ndarray, real: np.ndarray | None) -> None:
    """Beside the sample's mp4: its frame grid (``samples/step_X.png`` and the TensorBoard image
    ``sample/frames``; the real clip of the same conditioning frame in the first row when it has the
    sample's shape) and, against that real clip, the scalars ``sample/motion_ratio`` (motion(sample) /
    motion(real): ~0 when the generator copies the conditioning frame), ``sample/sharpness_ratio`` and
    ``sample/frame0_psnr`` (fidelity to the conditioning frame)."""
    same = real is not None and real.shape == sample.shape
    grid = video_io.frame_grid([real, sample] if same else [sample])
    video_io.write_video(workdir / "samples" / f"step_{step:07d}.png", grid[None])
    writer.write_images(step, {"sample/frames": grid[None]})
    if real is None:
        return
    scalars = {"sample/motion_ratio": video_metrics.motion(sample[None]) / max(video_metrics.motion(real[None]), 1e-9)}
    if same:
        scalars["sample/sharpness_ratio"] = video_metrics.sharpness(sample[None]) / max(
            video_metrics.sharpness(real[None]), 1e-9
        )
        scalars["sample/frame0_psnr"] = min(video_metrics.psnr(sample[0], real[0]), 100.0)
    writer.write_scalars(step, scalars)


def save_checkpoint(mngr, state: train_steps.TrainState, step: int, meta: dict, *, wait: bool = False) -> None:
    """Save ``state`` and ``meta`` (+ ``step``) as checkpoint ``step`` (asynchronously; ``wait``: until it is on
    disk); a step already saved is not saved twice."""
    if mngr.latest_step() != step:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step, **meta}))
        mngr.save(step, args=args)
    if wait:
        mngr.wait_until_finished()


def nonfinite_steps(pending: list[tuple[int, dict[str, Any]]]) -> list[int]:
    """The steps among ``pending`` ((step, metrics) with the steps' ``*_finite`` flags, on the device or
    not) whose loss or gradient was not finite; one device -> host transfer for all of them."""
    flags = jax.device_get([[v for k, v in m.items() if k.endswith("_finite")] for _, m in pending])
    return [step for (step, _), f in zip(pending, flags, strict=True) if f and min(f) < 1]


class SampleWriter:
    """``writer(state, step)``: a sample of the EMA generator on the data's fixed conditioning frame (SF-V's
    sampler, or the teacher's with guidance for the diffusion objective) as ``samples/step_X.mp4`` with its
    frame grid and diagnostics (:func:`write_sample_diagnostics`). One device: the EMA (with the frozen
    parameters) as it is. A mesh: it is gathered and every process samples on its first device alone, like
    the pipeline's other inputs (the same result everywhere; process 0 writes)."""

    def __init__(self, config, workdir: Path, writer, plan, lay, vae_params, clip_params, source: ClipSource):
        self.config, self.workdir, self.writer, self.plan = config, workdir, writer, plan
        self.frame, self.real = source.sample_frame(), source.sample_clip()
        self.pipe = SVDPipeline(lay.unet.clone(remat_policy="none"), None, lay.vae, vae_params, lay.clip, clip_params)
        self.gather = jax.jit(lambda t: t, out_shardings=plan.replicated)
        d = config.data
        self.settings = GenerationSettings.from_mapping(  # the sample section's size and guidance, the data's rest
            config.sample,
            num_frames=d.num_frames,
            num_inference_steps=config.sample.steps,
            fps=d.fps,
            motion_bucket_id=d.motion_bucket_id if d.motion_bucket_id >= 0 else 127,
            noise_aug_strength=d.noise_aug_strength,
            sampler=objectives.SAMPLER[config.objective],
        )

    def __call__(self, state: train_steps.TrainState, step: int) -> None:
        config, d = self.config, self.config.data
        ema = state.unet_params("ema")
        self.pipe.unet_params = (
            ema
            if self.plan.mesh.devices.size == 1
            else jax.device_put(jax.tree.map(lambda x: x.addressable_data(0), self.gather(ema)), jax.local_devices()[0])
        )
        frames = self.pipe.generate([self.frame], [config.seed], self.settings)[0]
        if jax.process_index() == 0:
            path = video_io.write_video(self.workdir / "samples" / f"step_{step:07d}.mp4", frames, fps=d.fps)
            logging.info("sample written to %s", path)
            write_sample_diagnostics(self.writer, self.workdir, step, video_io.to_uint8(frames), self.real)


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


def interval_metrics(interval: list[dict[str, Any]]) -> dict[str, float]:
    """The log line's metrics from the device metrics of the steps since the last one (one device -> host
    transfer): means over the steps, per-level statistics weighed by samples (``losses.reduce_interval``)."""
    return losses.reduce_interval(jax.device_get(interval))


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
    # ------------------------------------------------------------------ workdir (refused before anything is written)
    workdir = Path(workdir).absolute()
    check_workdir(config, workdir)
    with OutputLock(workdir, "--workdir", command="sfv-train", part=sharding.lock_part()) as lock:
        if lock.previous:
            logging.warning("--workdir %s: a previous run (%s) ended without releasing it", workdir, lock.previous)
        return _train(config, workdir, t_start, verbose_tables)


def _train(
    config: ml_collections.ConfigDict, workdir: Path, t_start: float, verbose_tables: bool
) -> train_steps.TrainState:
    """:func:`train` once the config is checked and the workdir is locked."""
    halt_every_step = config.opt.halt_check == "every_step"
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:
        text = config.to_json_best_effort(indent=2) + "\n"
        write_atomic(workdir / "config.json", lambda p: p.write_text(text))
    # ------------------------------------------------------------------ logging
    # TensorBoard events only (process 0); the console gets one readable line per log step (below)
    writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(workdir))] if lead else [])
    writer.write_hparams(flat_hparams(config))
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
    trained, frozen = param_groups.split(unet_params, config.trainable)
    for name, params in (
        (f"generator (UNet, trained: {config.trainable})", trained),
        *([("UNet (frozen part)", frozen)] if frozen else []),
        *([("discriminator heads", head_params)] if head_params else []),
        ("VAE (frozen)", vae_params),
        ("image encoder (frozen)", clip_params),
    ):
        line = describe_params(name, params)
        logging.info("%s", line)
        tables.append(f"{line}\n{parameter_overview.get_parameter_overview(params)}\n")
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

    if jax.process_count() > 1:  # every process compiles its steps, then they start together
        t0 = time.time()
        steps.compile(state, lay.abstract_batch(config), backbone)
        logging.info("steps compiled in %.0f s; waiting for the other processes", time.time() - t0)
        sharding.barrier("steps compiled")

    # ------------------------------------------------------------------ restore
    mngr = checkpoint_manager(workdir, config)
    position, data_state = 0, None
    if mngr.latest_step() is not None:
        # into the shardings of the fresh state (any mesh saved it); an unreadable checkpoint is set aside
        state, meta = restore_newest_readable(mngr, state, workdir, config.checkpoint_fallback)
        position, data_state = int(meta["data_position"]), meta.get("data_iterator")
        logging.info("resumed from %s at step %d (data position %d)", mngr.directory, int(state.step), position)
    first = int(state.step)  # from here on the host counts the steps: no wait for the device
    todo = max(0, config.total_steps - first)
    batches = loader.iterator_from_state(data_state, todo) if data_state else loader.iterator(position, todo)

    def save(state, step: int, wait: bool = False) -> None:
        meta = {"data_position": position, "samples_per_step": per_step, "data_iterator": batches.get_state()}
        save_checkpoint(mngr, state, step, meta, wait=wait)

    # ------------------------------------------------------------------ samples
    write_sample = SampleWriter(config, workdir, writer, plan, lay, vae_params, clip_params, source)
    grip = (  # SF-V: the heads' margin and pair rank on fixed clips
        HeldOutGrip(config, plan, lay, steps, encoder, backbone, writer)
        if config.heldout_every_steps and steps.d_grads is not None
        else None
    )

    # ------------------------------------------------------------------ loop
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    if first >= config.total_steps:
        logging.warning("checkpoint step %d >= total_steps %d: nothing to do", first, config.total_steps)
    metrics: dict[str, float] = {}
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet looked at by the host
    interval: list[Any] = []  # the device metrics of the steps since the last log line
    t_loop = t_first = t_log = time.time()
    step_log = first

    def check_finite(done: int) -> None:
        """Look at the pending steps' finite flags (one device -> host transfer); warn, maybe halt."""
        if bad := nonfinite_steps(pending):
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
            if done == first + 1:  # the first step includes compiling the steps
                with stop.at_once():  # before the line below: a signal sent on reading it must not be caught
                    logging.info("step %d: compiling the steps (a stop signal now ends the run at once)", done)
                    state, step_metrics = steps.step(state, batch, backbone)
                    jax.block_until_ready(state.step)
                t_first = t_log = time.time()
            else:
                state, step_metrics = steps.step(state, batch, backbone)
            position = batches.position
            pending.append((done, step_metrics))
            interval.append(step_metrics)
            report(done)
            last = done == config.total_steps
            if done % config.log_every_steps == 0 or last:
                metrics = interval_metrics(interval)
                check_finite(done)
                pending.clear()
                interval.clear()
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
            if grip and (done % config.heldout_every_steps == 0 or last):
                grip(state, done)
            if stop.requested:
                logging.warning("stopped at step %d on request; checkpoint saved in %s", done, mngr.directory)
                break
    if pending:  # a stop between log steps: its steps' finite flags
        check_finite(int(pending[-1][0]))
    if interval:  # ... and its metrics
        metrics = interval_metrics(interval)
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
