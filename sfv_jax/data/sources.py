"""The training data kinds (``config.data.kind``) as grain ``MapDataset``s: global sample position -> clip.

  ``synthetic``  the embedded synthetic videos (:mod:`sfv_jax.data.synthetic`); clip ``p`` is video ``p``
  ``folder``     a dataset built by ``python -m sfv_jax.cli.build_dataset`` (``data.path``)
  ``ucf101``     TFDS ``ucf101`` (``data.tfds_name``, prepared with ``file_format=array_record`` in
                 ``data.tfds_data_dir``); videos at ``data.source_fps`` resampled to ``data.fps``,
                 resized and centre-cropped to ``data.height x data.width`` when read
  ``latents``    a latent dataset written by ``python -m sfv_jax.cli.encode_dataset`` (``data.path``)

Position ``p`` of a real dataset with ``n`` records reads record ``shuffle_e(p mod n)`` of epoch
``e = p // n`` (grain's index shuffle, reseeded every epoch by ``data.seed``), and its training window of
``data.num_frames`` frames starts at a uniform offset drawn from ``default_rng([data.seed, p])``: the same
seed and step always give the same clips, on any number of processes. The window's first frame is the
conditioning image. A record too short for the window is replaced by the next one that fits
(``record + j * 7919``), counted in :attr:`ClipSource.too_short`.

    src = ClipSource(config)            # len(src) records; src[p] -> {"frames" | latents..., "record", ...}
    ds = src.dataset()                  # grain.MapDataset, infinite, position -> example
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from sfv_jax.data import clips
from sfv_jax.data.folder import DatasetError, open_folder_dataset
from sfv_jax.data.latent_store import FIELDS, SAMPLE_FRAME, LatentSource, LatentStoreError
from sfv_jax.data.synthetic import synthetic_clip

KINDS = ("synthetic", "folder", "ucf101", "latents")
PIXEL_KINDS = ("synthetic", "folder", "ucf101")
_STRIDE = 7919  # a prime: the replacement of a too-short record walks the whole dataset


class DataConfigError(ValueError):
    """A ``config.data`` that does not match its dataset (the message names the ``--config.data.`` flag)."""


def _tfds_source(d):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(d.tfds_name, split=d.split, data_dir=d.tfds_data_dir, download=False)
    except Exception as e:  # noqa: BLE001 -- TFDS raises many types; all mean "not prepared here"
        raise DataConfigError(
            f"--config.data.tfds_name={d.tfds_name} (split {d.split!r}, data_dir {d.tfds_data_dir}): cannot open it "
            f"as a data source ({type(e).__name__}: {e}). Prepare it once on a machine with internet: "
            f"`tfds build {d.tfds_name} --file_format=array_record --data_dir DIR`, then pass "
            f"--config.data.tfds_data_dir=DIR"
        ) from e


class ClipSource:
    """Records of ``config.data``'s dataset and the clip of any global sample position (see module doc)."""

    def __init__(self, config):
        d = config.data
        self.config, self.kind, self.seed = config, d.kind, int(d.get("seed", config.seed)) % 2**32
        self.num_frames, self.height, self.width, self.fps = d.num_frames, d.height, d.width, float(d.fps)
        self.too_short = 0
        self._lock = threading.Lock()
        self.info: dict[str, Any] = {}
        if self.kind not in KINDS:
            raise DataConfigError(f"--config.data.kind={self.kind!r}: must be one of {KINDS}")
        if self.kind == "synthetic":
            self.records = None
        elif self.kind == "folder":
            if not d.path:
                raise DataConfigError("--config.data.path: the folder dataset to read (data.kind=folder)")
            try:
                self.records, self.info = open_folder_dataset(d.path, d.split)
            except DatasetError as e:
                raise DataConfigError(f"--config.data.path: {e}") from e
            got = (self.info["fps"], self.info["height"], self.info["width"])
            if got != (self.fps, d.height, d.width):
                raise DataConfigError(
                    f"--config.data.path={d.path} holds {got[1]}x{got[2]} frames at {got[0]:g} fps but the config "
                    f"trains on {d.height}x{d.width} at {d.fps:g} fps (--config.data.height/width/fps); rebuild it "
                    f"or change the config"
                )
            if self.info["min_frames"] < d.num_frames:
                logging.warning(
                    "%s was built with --min-frames %d < data.num_frames %d: short videos are replaced",
                    d.path,
                    self.info["min_frames"],
                    d.num_frames,
                )
        elif self.kind == "ucf101":
            self.records = _tfds_source(d)
        else:
            if not d.path:
                raise DataConfigError("--config.data.path: the latent dataset to read (data.kind=latents)")
            try:
                self.records = LatentSource(d.path)
            except LatentStoreError as e:
                raise DataConfigError(f"--config.data.path: {e}") from e
            self.info = self.records.info
            want = {"num_frames": d.num_frames, "height": d.height, "width": d.width, "fps": self.fps}
            bad = {k: (self.info[k], v) for k, v in want.items() if self.info[k] != v}
            if bad:
                raise DataConfigError(
                    f"--config.data.path={d.path} was encoded with "
                    + ", ".join(f"data.{k}={a}" for k, (a, _) in bad.items())
                    + " but the config has "
                    + ", ".join(f"--config.data.{k}={b}" for k, (_, b) in bad.items())
                )
        if self.records is not None and len(self.records) == 0:
            raise DataConfigError(f"--config.data ({self.kind}): the dataset has no records")

    def __len__(self) -> int:
        return 0 if self.records is None else len(self.records)

    def dataset(self, *, shuffle: bool = True):
        """grain.MapDataset, position -> example; infinite (repeated, reshuffled per epoch) unless
        ``shuffle=False``, which gives each record once in order (what the latent encoder reads)."""
        import grain

        if self.records is None:
            return grain.MapDataset.range(2**62).map(self.example)
        ds = grain.MapDataset.range(len(self.records))
        if shuffle:
            ds = ds.shuffle(seed=self.seed).repeat()
        return ds.map_with_index(lambda p, r: self.example(p, r))

    def example(self, position: int, record: int | None = None) -> dict[str, Any]:
        """The clip of ``position`` (record ``record``): pixel kinds ``{"frames": uint8 [F, H, W, 3],
        "motion_score", "record"}``; latents: the stored arrays and ``record``."""
        position = int(position)
        if self.kind == "synthetic":
            frames = synthetic_clip(
                self.config.seed,
                position,
                self.num_frames,
                self.height,
                self.width,
                self.config.data.synthetic_detail,
                self.config.data.synthetic_mean_colour,
            )
            return {"frames": frames, "motion_score": clips.motion_score(frames), "record": position}
        n = len(self.records)
        r = int(record)
        for _attempt in range(n):
            rec = self.records[r]
            if self.kind == "latents":
                return {**{k: np.asarray(rec[k]) for k in FIELDS}, "record": r}
            frames = self._window(rec, np.random.default_rng([self.seed, position]))
            if frames is not None:
                return {"frames": frames, "motion_score": clips.motion_score(frames), "record": r}
            with self._lock:
                self.too_short += 1
            r = (r + _STRIDE) % n
        raise DataConfigError(
            f"--config.data.num_frames={self.num_frames}: no record of the {self.kind} dataset "
            f"has that many frames at {self.fps:g} fps"
        )

    def first_clip(self, record: int) -> np.ndarray | None:
        """uint8 [F, H, W, 3]: the first ``data.num_frames`` frames of ``record`` (at ``data.fps``, resized),
        or None if it is shorter (folder and ucf101 kinds; the FVD protocol's real clips)."""
        if self.records is None or self.kind == "latents":
            raise DataConfigError(
                f"--config.data.kind={self.kind}: clips from the start of a video need a folder or ucf101 dataset"
            )
        return self._window(self.records[int(record)], None)

    def _window(self, rec: dict[str, Any], rng: np.random.Generator | None) -> np.ndarray | None:
        """The clip at a random window (``rng``) or the first one (``rng=None``); None if too short."""
        f = self.num_frames
        if self.kind == "folder":
            jpegs = rec["frames"]
            if len(jpegs) < f:
                return None
            s = clips.window_start(len(jpegs), f, rng) if rng is not None else 0
            return np.stack([clips.decode_jpeg(j) for j in jpegs[s : s + f]])
        video = rec["video"]  # ucf101: [T, h, w, 3] at data.source_fps
        idx = clips.resample_indices(len(video), float(self.config.data.source_fps), self.fps)
        if len(idx) < f:
            return None
        s = clips.window_start(len(idx), f, rng) if rng is not None else 0
        return np.stack([clips.resize_crop(np.asarray(video[i]), self.height, self.width) for i in idx[s : s + f]])

    def sample_clip(self) -> np.ndarray | None:
        """uint8 [F, H, W, 3]: the real clip whose first frame is :meth:`sample_frame` (the trainer compares
        its samples with it), or None for the latents kind (its folder keeps only the frame)."""
        if self.kind == "synthetic":
            return synthetic_clip(
                self.config.seed + 10_000_019,
                0,
                self.num_frames,
                self.height,
                self.width,
                self.config.data.synthetic_detail,
                self.config.data.synthetic_mean_colour,
            )
        if self.kind == "latents":
            return None
        return self.example(0, 0)["frames"]

    def sample_frame(self) -> np.ndarray:
        """uint8 [H, W, 3]: the trainer's fixed sample conditioning image (first frame of record 0)."""
        if self.kind == "latents":
            from PIL import Image

            with Image.open(Path(self.config.data.path) / SAMPLE_FRAME) as img:
                return np.asarray(img.convert("RGB"))
        return self.sample_clip()[0]
