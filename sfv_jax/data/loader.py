"""Per-process training batches: global sample positions -> this process's rows, encoded, prefetched.

A training step consumes samples ``position .. position + k * m`` (k = ``data.accum_steps``, m = the
global micro batch) in train_steps' ``[k, m, ...]`` layout: sample ``position + i * m + r`` sits at
``[i, r]``. A process loads only its rows r (``sharding.Plan.local_rows``), so processes read disjoint
samples that together cover every position, and :meth:`sfv_jax.parallel.sharding.Plan.global_batch` assembles
the global, sharded ``jax.Array``s (``jax.make_array_from_process_local_data``).

    loader = Loader(config, encoder, global_micro=m, rows=plan.local_rows(m))
    batch = loader.batch(position)                       # numpy {name: [k, len(rows), ...]}
    it = loader.iterator(position, num_steps)            # prefetching (grain threads), same batches
    batch = next(it); state = it.get_state()             # {"position": next position, ...} -> checkpoint
    it = loader.iterator_from_state(state, num_steps)    # a resumed run: the same next batch

Pixel kinds are encoded on the fly with the frozen VAE / image encoder (:class:`ClipEncoder`); the
``latents`` kind is read as stored. The conditioning ``fps`` id is ``data.fps`` (the rate clips are
resampled to); ``motion_bucket_id`` is ``data.motion_bucket_id``, or (-1) the clip's motion bucket.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sfv_jax.data import clips
from sfv_jax.data.latent_store import FIELDS
from sfv_jax.data.sources import ClipSource, DataConfigError


class Loader:
    def __init__(
        self, config, encoder=None, *, global_micro: int | None = None, rows=None, source: ClipSource | None = None
    ):
        d = config.data
        self.config, self.encoder = config, encoder
        self.source = source or ClipSource(config)
        self.k = d.accum_steps
        self.m = d.micro_batch if global_micro is None else int(global_micro)
        self.rows = np.arange(self.m) if rows is None else np.asarray(rows)
        self.per_step = self.k * self.m
        self.examples = self.source.dataset()
        if self.source.kind != "latents" and encoder is None:
            raise DataConfigError(f"--config.data.kind={self.source.kind}: on-the-fly encoding needs the encoder")

    def positions(self, position: int) -> np.ndarray:
        """Global sample positions of this process's part of the step starting at ``position``: [k * R]."""
        return (position + np.arange(self.k)[:, None] * self.m + self.rows[None, :]).reshape(-1)

    def batch(self, position: int) -> dict[str, np.ndarray]:
        """This process's part of the step starting at ``position``: numpy ``{name: [k, R, ...]}``."""
        d = self.config.data
        index = self.positions(position)
        examples = [self.examples[int(p)] for p in index]
        if self.source.kind == "latents":
            batch = {k: np.stack([e[k] for e in examples]).astype(np.float32) for k in FIELDS}
            batch["index"] = index.astype(np.int32)
        else:
            frames = np.stack([e["frames"] for e in examples])
            buckets = clips.motion_bucket_ids(d.motion_bucket_id, [e["motion_score"] for e in examples])
            aug = clips.noise_aug_strengths(
                d.noise_aug, d.noise_aug_strength, d.noise_aug_log_mean, d.noise_aug_log_std, self.config.seed, index
            )
            batch = self.encoder(frames, index, fps=d.fps, motion_bucket_ids=buckets, noise_aug_strength=aug)
        return {k: v.reshape(self.k, len(self.rows), *v.shape[1:]) for k, v in batch.items()}

    def iterator(self, position: int, num_steps: int) -> BatchIterator:
        return BatchIterator(self, position, num_steps)

    def iterator_from_state(self, state: dict[str, Any], num_steps: int) -> BatchIterator:
        it = BatchIterator(self, int(state["position"]), num_steps)
        it.set_state(state)
        return it


class BatchIterator:
    """The next ``num_steps`` batches from ``position``, loaded ahead by ``data.workers`` threads
    (``data.prefetch`` steps in flight; grain ``to_iter_dataset``). State: the next step's position."""

    def __init__(self, loader: Loader, position: int, num_steps: int):
        self.loader, self.num_steps = loader, int(num_steps)
        self._start(int(position), 0)

    def _start(self, position: int, done: int) -> None:
        import grain

        d = self.loader.config.data
        self.position, self._done = position, done
        start, step = position, self.loader.per_step
        ds = grain.MapDataset.range(max(0, self.num_steps - done)).map(lambda s: self.loader.batch(start + s * step))
        opts = grain.ReadOptions(num_threads=max(1, int(d.workers)), prefetch_buffer_size=max(1, int(d.prefetch)))
        self._it = iter(ds.to_iter_dataset(opts))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.position += self.loader.per_step
        self._done += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON: where the next batch starts, and what it reads (checked by :meth:`set_state`)."""
        src = self.loader.source
        return {
            "position": self.position,
            "kind": src.kind,
            "records": len(src),
            "seed": src.seed,
            "samples_per_step": self.loader.per_step,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        src = self.loader.source
        if (state.get("kind"), state.get("records"), state.get("seed")) != (src.kind, len(src), src.seed):
            logging.warning(
                "the data iterator state was saved for %s data (%s records, seed %s); this run reads "
                "%s (%d records, seed %d): the stream continues at position %d but differs",
                state.get("kind"),
                state.get("records"),
                state.get("seed"),
                src.kind,
                len(src),
                src.seed,
                state["position"],
            )
        self._start(int(state["position"]), self._done)
