"""A folder of videos -> a TFDS dataset of JPEG frame sequences in array_record (the ``folder`` data kind).

    python -m sfv_jax.cli.build_dataset --videos DIR --out DIR --fps 7 --height 448 --width 768

Every video under ``--videos`` (recursive; mp4, webm, avi, mov, mkv, m4v) is decoded with PyAV's bundled
ffmpeg, resampled to ``fps``, resized and centre-cropped to ``height x width`` (:mod:`sfv_jax.data.clips`)
in ``workers`` processes, and written by :class:`VideoFolder` (a ``tfds.core.GeneratorBasedBuilder``) as
one example per video:

  ``frames``        Sequence(Image(jpeg))  [T, height, width, 3] at ``fps``
  ``path``          Text                   the video's path relative to ``--videos``
  ``fps``           float32                the source's frame rate
  ``duration``      float32                the source's duration, seconds
  ``num_frames``    int32                  T
  ``motion_score``  float32                mean |frame difference| of the resampled frames, grey levels

Unreadable, truncated and too-short (< ``min_frames`` after resampling) videos are skipped, logged and
listed in ``sfv_build.json``; a folder with no usable video is an error. The dataset is built in a
temporary folder next to ``--out`` and renamed into place at the end, so ``--out`` is either complete or
absent. Reading needs no TensorFlow: :func:`open_folder_dataset` (a TFDS data source, random access,
frames left encoded so a reader decodes only the window it uses).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sfv_jax.data import clips
from sfv_jax.paths import folder_problem, output_overlaps, publish, remove_stale_staging, staging_name, stop_on_signal

BUILD_INFO = "sfv_build.json"


class DatasetError(ValueError):
    """A dataset that cannot be built or read (the message names the folder, file or flag)."""


class VideoFolderConfig(tfds.core.BuilderConfig):
    def __init__(
        self,
        *,
        videos: str,
        fps: float,
        height: int,
        width: int,
        min_frames: int,
        max_seconds: float | None,
        workers: int,
    ):
        super().__init__(
            name=f"fps{fps:g}_{height}x{width}".replace(".", "p"),
            version="1.0.0",
            description=f"{videos} at {fps:g} fps, {height}x{width}",
        )
        self.videos, self.fps, self.height, self.width = videos, fps, height, width
        self.min_frames, self.max_seconds, self.workers = min_frames, max_seconds, workers


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of a local folder of videos (see the module docstring); one ``train`` split."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []

    def __init__(self, *, config: VideoFolderConfig, **kwargs):
        self.skipped: list[tuple[str, str]] = []
        self.num_videos = 0
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "frames": tfds.features.Sequence(
                        tfds.features.Image(shape=(c.height, c.width, 3), encoding_format="jpeg")
                    ),
                    "path": tfds.features.Text(),
                    "fps": np.float32,
                    "duration": np.float32,
                    "num_frames": np.int32,
                    "motion_score": np.float32,
                }
            ),
            description=c.description,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        root = Path(c.videos)
        paths = clips.find_videos(root)
        self.num_videos = len(paths)
        jobs = [
            (str(p), p.relative_to(root).as_posix(), c.fps, c.height, c.width, c.min_frames, c.max_seconds)
            for p in paths
        ]
        done, kept, t0 = 0, 0, time.time()
        if c.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(c.workers)  # no fork of a TF/JAX process
            results = pool.imap(clips.prepare_example, jobs, chunksize=1)
        else:
            pool, results = None, map(clips.prepare_example, jobs)
        try:
            for res in results:
                done += 1
                if "skipped" in res:
                    self.skipped.append((res["key"], res["skipped"]))
                    logging.warning("skipped %s: %s", res["key"], res["skipped"])
                else:
                    kept += 1
                    yield res["key"], res["example"]
                if done % 100 == 0 or done == len(jobs):
                    logging.info(
                        "decoded %d/%d videos (%d kept, %d skipped), %.1f videos/s",
                        done,
                        len(jobs),
                        kept,
                        done - kept,
                        done / max(time.time() - t0, 1e-9),
                    )
        finally:
            if pool is not None:
                pool.terminate()
        if not kept:
            detail = "; ".join(f"{k}: {r}" for k, r in self.skipped[:5])
            raise DatasetError(
                f"{root}: no usable video ({len(paths)} video files with extensions "
                f"{', '.join(clips.VIDEO_EXTENSIONS)} found" + (f"; skipped {detail}" if detail else "") + ")"
            )


def build_folder_dataset(
    videos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fps: float,
    height: int,
    width: int,
    min_frames: int = 14,
    max_seconds: float | None = 60.0,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the dataset of ``videos`` into ``out`` (see the module docstring); returns the build info
    (``examples``, ``skipped`` count, ``skipped_videos`` [(path, reason)], the build parameters)."""
    videos, out = Path(videos).absolute(), Path(out).absolute()
    if not videos.is_dir():
        raise DatasetError(f"--videos {videos}: not a folder")
    for flag, v in (("--fps", fps), ("--height", height), ("--width", width), ("--min-frames", min_frames)):
        if not math.isfinite(v) or v <= 0:
            raise DatasetError(f"{flag} must be a positive number, got {v!r}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise DatasetError(
            f"--max-seconds must be a positive number of seconds (0: keep everything), got {max_seconds!r}"
        )
    if problem := output_overlaps("--out", out, {"--videos": videos}):
        raise DatasetError(problem)
    if out.is_symlink():
        raise DatasetError(f"--out {out}: is a symbolic link (to {os.path.realpath(out)}); give the real path")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out}: is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    if problem := folder_problem("--out", out.parent):
        raise DatasetError(problem)
    remove_stale_staging(out)
    tmp = staging_name(out)
    with stop_on_signal(lambda: shutil.rmtree(tmp, ignore_errors=True)):
        return _build(videos, out, tmp, fps, height, width, min_frames, max_seconds, workers)


def _build(videos, out, tmp, fps, height, width, min_frames, max_seconds, workers) -> dict[str, Any]:
    try:
        config = VideoFolderConfig(
            videos=str(videos),
            fps=float(fps),
            height=int(height),
            width=int(width),
            min_frames=int(min_frames),
            max_seconds=max_seconds,
            workers=int(workers),
        )
        builder = VideoFolder(config=config, data_dir=str(tmp), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
        info = {
            "examples": int(builder.info.splits["train"].num_examples),
            "skipped": len(builder.skipped),
            "videos": builder.num_videos,
            "skipped_videos": builder.skipped,
            "source": str(videos),
            "fps": float(fps),
            "height": int(height),
            "width": int(width),
            "min_frames": int(min_frames),
            "max_seconds": max_seconds,
        }
        built = Path(builder.data_dir)
        (built / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        publish(built, out)  # an existing --out is replaced only now that the new one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def read_build_info(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / BUILD_INFO
    if not f.is_file():
        raise DatasetError(f"{path}: not a dataset built by sfv_jax.cli.build_dataset (no {BUILD_INFO})")
    return json.loads(f.read_text())


class _KeepEncoded(tfds.decode.Decoder):
    """Leaves a ``Sequence(Image)`` as its JPEG bytes (TFDS's SkipDecoding lacks the numpy batch path)."""

    def decode_example(self, serialized):
        return serialized

    decode_example_np = decode_batch_example_np = decode_example


def open_folder_dataset(path: str | os.PathLike, split: str = "train"):
    """(random-access data source, build info) of a built folder dataset. Records are dicts with
    ``frames`` a list of JPEG bytes (decode only what you use: :func:`sfv_jax.data.clips.decode_jpeg`)."""
    info = read_build_info(path)
    if not (Path(path) / "dataset_info.json").is_file():
        raise DatasetError(f"{path}: no dataset_info.json (an incomplete copy of a built dataset?)")
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
        raise DatasetError(
            f"{path}: has no split {split!r} (it has {sorted(builder.info.splits)}; --config.data.split)"
        )
    source = builder.as_data_source(split, decoders={"frames": _KeepEncoded()})
    return source, info
