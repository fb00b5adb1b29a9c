"""Pre-encode a training dataset into latents once (see :mod:`sfv_jax.data.latent_store`).

    python -m sfv_jax.cli.encode_dataset --config configs/sfv_svd.py --out DIR \\
        --config.init_from=checkpoints/svd --config.data.kind=folder --config.data.path=data/clips

Every record of ``config.data``'s dataset (a folder dataset, UCF-101, or ``--limit`` synthetic videos)
gives one clip -- the window ``data.seed`` picks for position = record -- encoded with the frozen JAX VAE
and image encoder exactly as training encodes on the fly (:class:`sfv_jax.data.latents.ClipEncoder`,
augmentation noise from the record index). Each process encodes records ``process_index::process_count``
split over its local devices, and writes one array_record file; multi-host runs need a shared ``--out``.
Then train with ``--config.data.kind=latents --config.data.path=DIR``: no VAE encoding in the loop.
The last line is ``examples=<n> clips_per_s=<x>``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import grain
import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags
from PIL import Image

from sfv_jax import console  # noqa: I001  (first: quietens TensorFlow before anything imports it)
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.data import clips, latent_store
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.sources import PIXEL_KINDS, ClipSource, DataConfigError
from sfv_jax.parallel import sharding
from sfv_jax.paths import OutputLock, folder_problem, output_overlaps, publish, remove_stale_staging, staging_name
from sfv_jax.training.layout import build_modules, frozen_encoders
from sfv_jax.training.run_config import ConfigError

FLAGS = flags.FLAGS
PROGRESS_EVERY_S = 10.0
config_flags.DEFINE_config_file(
    "config", None, "training config (its data and model sections are used)", lock_config=True
)
flags.DEFINE_string("out", None, "output latent dataset folder")
flags.DEFINE_integer("batch_size", 0, "clips per encoder call per process (default: 2 x local devices)")
flags.DEFINE_integer("limit", 0, "encode only the first N records (required for data.kind=synthetic)")
flags.DEFINE_bool("overwrite", False, "replace an existing --out")
flags.mark_flags_as_required(["config", "out"])


def encode_dataset(config, out: str | Path, *, batch_size: int = 0, limit: int = 0, overwrite: bool = False) -> dict:
    """Encode ``config.data``'s dataset into ``out``; returns the written info (``examples``, timings)."""
    d, out = config.data, Path(out).absolute()
    if d.kind not in PIXEL_KINDS:
        raise DataConfigError(f"--config.data.kind={d.kind}: encode a pixel dataset, one of {PIXEL_KINDS}")
    inputs = {"--config.data.path": d.path, "--config.data.tfds_data_dir": d.tfds_data_dir}
    if problem := output_overlaps("--out", out, {**inputs, "--config.init_from": config.init_from}):
        raise DataConfigError(problem)
    if problem := folder_problem("--out", out, replaced=True):  # a file, a symbolic link, an unwritable place
        raise DataConfigError(problem)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataConfigError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    with OutputLock(out, "--out", command="sfv-encode-dataset", part=sharding.lock_part()):
        return _encode_locked(config, out, limit, batch_size)


def _encode_locked(config, out: Path, limit: int, batch_size: int) -> dict:
    """:func:`encode_dataset` once ``out`` is checked and locked."""
    source = ClipSource(config)
    n = len(source) if len(source) else limit
    if not n:
        raise DataConfigError("--limit: how many synthetic clips to encode (data.kind=synthetic has no end)")
    n = min(n, limit) if limit else n
    pi, pc = jax.process_index(), jax.process_count()
    # one staging folder for the whole job, unique to it: process 0 names it, the others write their shards there
    partial = staging_name(out)
    if pc > 1:
        partial = partial.with_name(_broadcast_name(partial.name))
    if pi == 0:
        remove_stale_staging(out)
        partial.mkdir(parents=True)
    _barrier("encode_dataset_start")
    try:
        return _encode(config, source, n, out, partial, batch_size)
    except BaseException:
        if pi == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _broadcast_name(name: str) -> str:
    """Process 0's ``name`` on every process (a staging folder's name: host, pid and a random tag)."""
    raw = np.zeros(256, np.uint8)
    raw[: len(name)] = np.frombuffer(name.encode(), np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw > 0]).decode()


def _encode(config, source: ClipSource, n: int, out: Path, partial: Path, batch_size: int) -> dict:
    d, pi, pc = config.data, jax.process_index(), jax.process_count()

    _, vae, clip = build_modules(config)
    vae_params, clip_params = frozen_encoders(config, vae, clip, jax.random.PRNGKey(config.seed))
    devices = jax.local_devices()
    encoder = ClipEncoder(vae, vae_params, clip, clip_params, seed=config.seed, devices=devices)
    batch_size = batch_size or 2 * len(devices)
    mine = list(range(pi, n, pc))
    ds = grain.MapDataset.source(mine).map(lambda r: source.example(r, r)).batch(batch_size)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(d.workers)), prefetch_buffer_size=2)))
    t0, done, logged = time.time(), [0], [0.0]

    def records():
        for b in it:
            buckets = clips.motion_bucket_ids(d.motion_bucket_id, b["motion_score"])
            enc = encoder(
                b["frames"], b["record"], fps=d.fps, motion_bucket_ids=buckets, noise_aug_strength=d.noise_aug_strength
            )
            for i in range(len(b["record"])):
                yield {
                    **{k: enc[k][i] for k in latent_store.FIELDS},
                    "record": b["record"][i],
                    "motion_score": b["motion_score"][i],
                }
            done[0] += len(b["record"])
            dt = time.time() - t0
            if dt - logged[0] >= PROGRESS_EVERY_S or done[0] == len(mine):  # a line every 10 s, and the last
                logged[0] = dt
                logging.info("process %d: encoded %d/%d clips, %.2f clips/s", pi, done[0], len(mine), done[0] / dt)

    written = latent_store.write_shard(partial / latent_store.shard_name(pi, pc), records())
    seconds = time.time() - t0
    _barrier("encode_dataset_written")
    f = vae.config.downsample_factor
    info = {
        "examples": n,
        "process_count": pc,
        "num_frames": d.num_frames,
        "height": d.height,
        "width": d.width,
        "fps": float(d.fps),
        "latent_shape": [d.num_frames, d.height // f, d.width // f, vae.config.latent_channels],
        "embed_dim": clip.config.projection_dim,
        "source_kind": d.kind,
        "source_path": d.path,
        "seed": config.seed,
        "noise_aug_strength": d.noise_aug_strength,
        "motion_bucket_id": d.motion_bucket_id,
        "init_from": config.init_from,
        "seconds_process0": round(seconds, 2),
        "clips_per_s": round(written / max(seconds, 1e-9) * pc, 3),
    }
    if pi == 0:
        Image.fromarray(source.example(0, 0)["frames"][0]).save(partial / latent_store.SAMPLE_FRAME)
        latent_store.write_info(partial, info)
        publish(partial, out)  # an existing --out is replaced only now that the new one is complete
    _barrier("encode_dataset_done")
    return info


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sharding.initialize_distributed()
        info = encode_dataset(
            FLAGS.config, FLAGS.out, batch_size=FLAGS.batch_size, limit=FLAGS.limit, overwrite=FLAGS.overwrite
        )
    except (ConfigError, DataConfigError, CheckpointError) as e:
        return console.fail(e)
    print(f"latent dataset written to {Path(FLAGS.out).absolute()}")
    print(f"examples={info['examples']} clips_per_s={info['clips_per_s']}")
    return 0


def run() -> None:
    """The ``sfv-encode-dataset`` console script."""
    console.run_absl(main)


if __name__ == "__main__":
    run()
