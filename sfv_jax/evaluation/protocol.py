"""The paper's FVD protocol (Sec. 4.2): the reference set and the per-chunk cache of generated videos.

Reference set (built once per dataset / protocol setting, by process 0, then read by every process):
records of ``config.data`` (UCF-101 through TFDS, or a folder dataset) in a seeded permutation; the
first ``num_videos`` whose video has ``data.num_frames`` frames at ``data.fps`` are used. For each: its
first frame (the conditioning image, at ``data.height x data.width``: UCF-101's native 320x240) and
its first ``data.num_frames`` frames (the real clip, whose I3D features give the real statistics).

    reference/<key>/records.json        the record ids, dataset identity, N
    reference/<key>/first_frames.npy    uint8 [N, H, W, 3]
    reference/<key>/real_stats.npz      FeatureStats of the real clips (float64)

Generated videos: video ``i`` of every row comes from first frame ``i`` with seed ``eval.seed + i``.
Videos are grouped in chunks of ``eval.chunk_size``; chunk ``c`` belongs to process ``c % P``. A chunk
file holds the I3D features of its videos, the per-stage seconds spent on it, and (``eval.keep_videos``)
the uint8 videos at the FVD size. Every file is written to a temporary name and renamed, so a killed run
leaves only whole chunks and a rerun computes only what is missing, with any number of devices/hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from sfv_jax.data import video_io
from sfv_jax.data.sources import PIXEL_KINDS, ClipSource, DataConfigError
from sfv_jax.evaluation.fvd import FeatureStats, I3DFeatures
from sfv_jax.paths import write_atomic

DATA_KEYS = (
    "kind",
    "path",
    "split",
    "tfds_name",
    "tfds_data_dir",
    "source_fps",
    "fps",
    "num_frames",
    "height",
    "width",
)


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (names cache folders)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_fingerprint(folder: str | os.PathLike) -> str:
    """A short hash that changes when the model in ``folder`` changes (so its cached rows are recomputed):
    every file's relative path, size and modification time, and the full text of its JSON files (configs,
    the converted format's metadata). Cheap: the weights are not read."""
    root = Path(folder).resolve()
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        entry = [str(path.relative_to(root)), st.st_size, st.st_mtime_ns]
        if path.suffix == ".json":
            entry.append(path.read_text(errors="replace"))
        entries.append(entry)
    return digest(entries)


def data_identity(config: ml_collections.ConfigDict) -> dict:
    """What defines the reference set: the dataset, the clip geometry, N and the selection seed."""
    return {
        **{k: config.data.get(k) for k in DATA_KEYS},
        "num_videos": config.eval.num_videos,
        "seed": config.eval.seed,
    }


@dataclasses.dataclass
class Reference:
    """The conditioning images and real statistics of the protocol (see the module doc)."""

    folder: Path
    records: list[int]
    first_frames: np.ndarray  # uint8 [N, H, W, 3]
    stats: FeatureStats
    seconds_per_video: dict[str, float]

    @classmethod
    def load(cls, folder: Path) -> Reference:
        meta = json.loads((folder / "records.json").read_text())
        return cls(
            folder,
            meta["records"],
            np.load(folder / "first_frames.npy", allow_pickle=False),
            FeatureStats.load(folder / "real_stats.npz"),
            meta["seconds_per_video"],
        )


def reference_folder(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return workdir / "reference" / digest(data_identity(config))


def build_reference(
    config: ml_collections.ConfigDict, folder: Path, features: I3DFeatures, progress: Any = None
) -> Reference:
    """Select the videos, keep their first frames, and fit the real clips' I3D features (module doc)."""

    if config.data.kind not in PIXEL_KINDS or config.data.kind == "synthetic":
        raise DataConfigError(
            f"--config.data.kind={config.data.kind}: FVD's real videos come from a dataset of "
            "videos: ucf101 (TFDS) or folder (python -m sfv_jax.cli.build_dataset)"
        )
    source = ClipSource(config)
    n_want = int(config.eval.num_videos)
    order = np.random.default_rng(config.eval.seed).permutation(len(source))
    records, first, stats = [], [], FeatureStats.empty()
    read_s = i3d_s = 0.0
    workers = max(1, int(config.data.get("workers", 4)))
    block = max(features.step, workers)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(order), block):
            t0 = time.perf_counter()
            ids = order[start : start + block].tolist()
            found = [(r, c) for r, c in zip(ids, pool.map(source.first_clip, ids)) if c is not None]
            found = found[: n_want - len(records)]
            read_s += time.perf_counter() - t0
            if found:
                t0 = time.perf_counter()
                stats.update(features(np.stack([c for _, c in found])))
                i3d_s += time.perf_counter() - t0
                records += [r for r, _ in found]
                first += [c[0] for _, c in found]
                if progress is not None:
                    progress.update(len(found))
            if len(records) == n_want:
                break
    if len(records) < n_want:
        raise DataConfigError(
            f"--config.eval.num_videos={n_want}: the {config.data.kind} dataset "
            f"({config.data.get('path') or config.data.tfds_name}, "
            f"split {config.data.split}) has only {len(records)} videos of at least {config.data.num_frames} frames at "
            f"{config.data.fps:g} fps out of {len(source)}; lower --config.eval.num_videos"
        )
    first_frames = np.stack(first)
    meta = {
        "identity": data_identity(config),
        "records": [int(r) for r in records],
        "seconds_per_video": {"read": read_s / n_want, "i3d": i3d_s / n_want},
    }
    write_atomic(folder / "first_frames.npy", lambda p: np.save(p, first_frames))
    stats.save(folder / "real_stats.npz")  # atomic itself
    write_atomic(folder / "records.json", lambda p: p.write_text(json.dumps(meta, indent=1)))  # last: the marker
    return Reference(folder, meta["records"], first_frames, stats, meta["seconds_per_video"])


# ---------------------------------------------------------------------------------------------- chunks


def chunks(num_videos: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk, in order."""
    return [(s, min(num_videos, s + chunk_size)) for s in range(0, num_videos, chunk_size)]


def my_chunks(num_videos: int, chunk_size: int, process_index: int, process_count: int) -> list[int]:
    """The chunk ids process ``process_index`` of ``process_count`` generates (round robin)."""
    return list(range(process_index, len(chunks(num_videos, chunk_size)), process_count))


def chunk_path(row_folder: Path, chunk: int) -> Path:
    return row_folder / f"chunk_{chunk:05d}.npz"


def write_chunk(
    path: Path, indices: np.ndarray, features: np.ndarray, seconds: dict[str, float], videos: np.ndarray | None
) -> Path:
    arrays = {
        "indices": indices,
        "features": features,
        "stages": np.asarray(list(seconds)),
        "seconds": np.asarray(list(seconds.values()), np.float64),
    }
    if videos is not None:
        arrays["videos"] = videos
    return write_atomic(path, lambda p: np.savez(p, **arrays))


def read_chunk(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {
            "indices": z["indices"],
            "features": z["features"],
            "seconds": dict(zip(z["stages"].tolist(), z["seconds"].tolist())),
            "videos": z["videos"] if "videos" in z.files else None,
        }


def iter_row_features(row_folder: Path, num_videos: int, chunk_size: int) -> Iterator[dict[str, Any]]:
    """Every chunk of a finished row, in order; a missing chunk is an error naming the file."""
    for c, (start, stop) in enumerate(chunks(num_videos, chunk_size)):
        path = chunk_path(row_folder, c)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing. Is --workdir on a file system every host shares? Rerun to generate it."
            )
        chunk = read_chunk(path)
        if chunk["indices"].tolist() != list(range(start, stop)):
            raise ValueError(
                f"{path}: holds videos {chunk['indices'].tolist()[:3]}..., not {start}..{stop - 1} "
                "(written with another eval.chunk_size? use a new --workdir)"
            )
        yield chunk


def to_fvd_size(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Generated float frames [B, F, h, w, 3] in [0, 1] -> uint8 [B, F, height, width, 3]: rounded as
    diffusers' ``numpy_to_pil``, then resized (PIL bicubic, antialiased; the aspect ratio is not kept:
    1024x576 -> 320x240 as the paper)."""
    from PIL import Image

    out = np.empty((*frames.shape[:2], height, width, 3), np.uint8)
    for b, video in enumerate(frames):
        for f, frame in enumerate(video_io.to_uint8(video)):
            out[b, f] = (
                frame
                if frame.shape[:2] == (height, width)
                else np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))
            )
    return out
