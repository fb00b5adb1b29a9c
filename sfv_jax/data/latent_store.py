"""The pre-encoded latent dataset (the ``latents`` data kind): array_record files of msgpack records.

Written by ``python -m sfv_jax.cli.encode_dataset`` (one file per process), read by the trainer with
``--config.data.kind=latents --config.data.path=DIR``. A folder holds

  ``latents-<process>-of-<processes>.array_record``  one record per clip: ``latents`` [F, h, w, 4] (scaled),
      ``image_latents`` [h, w, 4], ``image_embeds`` [D], ``added_time_ids`` [3], ``record`` (the source
      record), ``motion_score`` -- what :class:`sfv_jax.data.latents.ClipEncoder` returns for one clip
  ``latents_info.json``   count, shapes, the source dataset and encoder config; written last, so a folder
      without it is an unfinished encode and is refused
  ``sample_frame.png``    the first frame of record 0 (the trainer's sample conditioning image)

Records are msgpack (flax.serialization), never pickle; reading needs neither TensorFlow nor JAX devices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization

INFO = "latents_info.json"
SAMPLE_FRAME = "sample_frame.png"
FIELDS = ("latents", "image_latents", "image_embeds", "added_time_ids")


class LatentStoreError(ValueError):
    """A latent dataset folder that is missing, unfinished or does not match the config."""


def shard_name(process_index: int, process_count: int) -> str:
    return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def write_shard(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records (dicts of numpy arrays / scalars) to one array_record file, via a temporary name
    renamed at the end; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(serialization.msgpack_serialize({k: np.asarray(v) for k, v in rec.items()}))
            n += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


def write_info(folder: str | os.PathLike, info: dict[str, Any]) -> None:
    folder = Path(folder)
    tmp = folder / f".{INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, folder / INFO)


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LatentStoreError(f"--config.data.path={folder}: no such folder")
    if not (folder / INFO).is_file():
        raise LatentStoreError(
            f"{folder}: no {INFO}: not a latent dataset, or its encode did not finish "
            f"(run python -m sfv_jax.cli.encode_dataset again)"
        )
    return json.loads((folder / INFO).read_text())


class LatentSource:
    """Random access to a latent dataset's records (``len``, ``[i]`` -> dict of numpy arrays)."""

    def __init__(self, folder: str | os.PathLike):
        import grain

        self.folder = Path(folder)
        self.info = read_info(self.folder)
        files = [self.folder / shard_name(i, self.info["process_count"]) for i in range(self.info["process_count"])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LatentStoreError(f"{self.folder}: missing {', '.join(missing)} (listed in {INFO})")
        self._source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        if len(self._source) != self.info["examples"]:
            raise LatentStoreError(f"{self.folder}: {len(self._source)} records, {INFO} says {self.info['examples']}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return serialization.msgpack_restore(self._source[i])
