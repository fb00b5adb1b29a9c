"""FVD evaluation, the paper's Table 1: ``sfv-evaluate --config configs/eval_ucf101.py --workdir DIR``.

Examples:
  python -m sfv_jax.cli.evaluate --config configs/eval_ucf101.py --workdir runs/eval \\
      --config.eval.sfv_model=checkpoints/sfv --config.eval.teacher_model=checkpoints/svd \\
      --config.data.tfds_data_dir=/data/tfds
  ... --config.eval.num_videos=512 --config.eval.sfv_steps="(1,)" --config.eval.teacher_steps="(25, 16)"
  ... --config.data.kind=folder --config.data.path=data/ucf_eval   (built at 320x240, 7 fps)

Rows: the SF-V generator (``eval.sfv_model``, an export of a training run) at each of ``eval.sfv_steps``
(no guidance) and the SVD teacher (``eval.teacher_model``) at each of ``eval.teacher_steps`` (Euler,
guidance linspace(1, 3) over frames). Each row generates ``eval.num_videos`` videos (14 frames at
1024x576, 7 fps) from the first frames of the reference videos (:mod:`sfv_jax.evaluation.protocol`),
resizes them to 320x240 and computes FVD against the real clips. UNet and end-to-end latency are
measured per row on one video (batch 1, one device, after a warm-up; median of ``eval.latency_repeats``),
as the paper's latency column. Everything is cached under ``--workdir``: the reference statistics, each
chunk of generated videos and features, each row's result; a rerun (also after a kill, with another
number of devices or hosts) computes only what is missing. A row's cache folder is keyed by its
settings and the model's fingerprint (files' sizes, times and JSON texts: another model written to the
same path is recomputed; the table shows each row's fingerprint). Multi-host: every process generates its own
chunks on its local devices; ``--workdir`` must be a shared file system; process 0 writes the table:
``DIR/fvd_table.md`` and ``DIR/fvd_table.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sfv_jax import timing
from sfv_jax.checkpoint import pretrained
from sfv_jax.diffusion import edm
from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.evaluation import protocol
from sfv_jax.evaluation.fvd import FEATURE_DIM, FeatureStats, I3DFeatures, fvd_from_stats
from sfv_jax.paths import folder_problem, output_overlaps, write_atomic

STAGES = ("image_encoder", "vae_encode", "unet", "vae_decode", "resize", "i3d")


class EvalConfigError(ValueError):
    """A ``config.eval`` that cannot run (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a model folder, its sampler ("sfv" or "svd") and step count."""

    name: str
    model: str
    sampler: str
    steps: int

    @functools.cached_property
    def fingerprint(self) -> str:
        """The model folder's :func:`protocol.model_fingerprint` (part of the cache key and the table)."""
        return protocol.model_fingerprint(self.model)

    def key(self, config: ml_collections.ConfigDict) -> str:
        e = config.eval
        settings = {
            "model": str(Path(self.model).resolve()),
            "fingerprint": self.fingerprint,
            "sampler": self.sampler,
            "steps": self.steps,
            "data": protocol.data_identity(config),
            "dtype": e.dtype,
            "height": e.height,
            "width": e.width,
            "motion_bucket_id": e.motion_bucket_id,
            "noise_aug_strength": e.noise_aug_strength,
            "guidance": (e.min_guidance_scale, e.max_guidance_scale),
            "chunk_size": e.chunk_size,
        }
        if self.sampler != "svd" and e.get("sfv_guidance", False):  # only when on: unguided rows keep their keys
            settings["sfv_guidance"] = True
        return f"{self.name}-{self.sampler}-{self.steps}steps-{protocol.digest(settings)}"


def rows(config: ml_collections.ConfigDict) -> list[Row]:
    e = config.eval
    # 1..T_g - 1 steps on the generator's trained levels; the paper's T_g-step row ends at the untrained sigma_min
    top = edm.SFV_GRID_SIZE - 1
    sfv_name = "SF-V guided" if e.get("sfv_guidance", False) else "SF-V"  # guided: the eval's guidance scales
    out = [
        Row(sfv_name, e.sfv_model, "sfv" if int(s) <= top else "sfv_grid", int(s))
        for s in (e.sfv_steps if e.sfv_model else ())
    ]
    out += [Row("SVD", e.teacher_model, "svd", int(s)) for s in (e.teacher_steps if e.teacher_model else ())]
    if not out:
        raise EvalConfigError(
            "nothing to evaluate: set --config.eval.sfv_model (an SF-V export) and/or "
            "--config.eval.teacher_model (an SVD folder), with their step lists"
        )
    for r in out:
        if r.sampler != "svd" and not 1 <= r.steps <= edm.SFV_GRID_SIZE:
            raise EvalConfigError(f"--config.eval.sfv_steps: {r.steps} is not in 1..4 (the generator's grid)")
        if r.steps < 1:
            raise EvalConfigError(f"--config.eval.teacher_steps: {r.steps} must be >= 1")
        if not Path(r.model, "model_index.json").is_file():
            flag = "teacher_model" if r.sampler == "svd" else "sfv_model"
            raise EvalConfigError(f"--config.eval.{flag}={r.model}: not an SVD pipeline folder (no model_index.json)")
    return out


def generation_settings(config: ml_collections.ConfigDict, row: Row) -> GenerationSettings:
    """A row's generation: the ``eval`` section's settings (under their own names), the data's frames and
    fps, the row's sampler and steps."""
    d = config.data
    return GenerationSettings.from_mapping(
        config.eval, num_frames=d.num_frames, fps=int(d.fps), num_inference_steps=row.steps, sampler=row.sampler
    )


def measure_latency(
    pipe: Any, image: np.ndarray, seed: int, settings: GenerationSettings, repeats: int
) -> dict[str, float]:
    """Seconds for one video (batch 1) after a warm-up call: the UNet stage and the whole call; medians."""
    t = timing.median_time(
        lambda: pipe.generate([image], [seed], settings), repeats, warmup=1, stages=lambda: pipe.last_timings
    )
    return {"unet_latency_s": t.stages_s["unet"], "e2e_latency_s": t.median_s}


def generate_chunk(
    pipe: Any,
    features: I3DFeatures,
    reference: protocol.Reference,
    config: ml_collections.ConfigDict,
    row: Row,
    start: int,
    stop: int,
) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """Videos ``start..stop-1`` of ``row``: -> (I3D features [n, 400], stage seconds, uint8 videos)."""
    settings = generation_settings(config, row)
    step = int(config.eval.batch_size) * pipe.num_devices
    seconds: dict[str, float] = defaultdict(float)
    videos = []
    for s in range(start, stop, step):
        idx = list(range(s, min(stop, s + step)))
        frames = pipe.generate([reference.first_frames[i] for i in idx], [config.eval.seed + i for i in idx], settings)
        for stage in ("image_encoder", "vae_encode", "unet", "vae_decode", "compile"):
            seconds[stage] += pipe.last_timings.get(stage, 0.0)
        t0 = time.perf_counter()
        videos.append(protocol.to_fvd_size(frames, config.data.height, config.data.width))
        seconds["resize"] += time.perf_counter() - t0
    videos = np.concatenate(videos)
    t0 = time.perf_counter()
    feats = features(videos)  # the whole chunk at once: I3D batches are padded only at its end
    seconds["i3d"] += time.perf_counter() - t0
    return feats, dict(seconds), videos


def finish_row(config: ml_collections.ConfigDict, row: Row, folder: Path, reference: protocol.Reference) -> dict:
    """FVD of a row whose chunks are all written, with its latency and per-stage seconds per video."""
    n = int(config.eval.num_videos)
    stats, seconds = FeatureStats.empty(FEATURE_DIM), defaultdict(float)
    for chunk in protocol.iter_row_features(folder, n, int(config.eval.chunk_size)):
        stats.update(chunk["features"])
        for k, v in chunk["seconds"].items():
            seconds[k] += v
    latency = json.loads((folder / "latency.json").read_text())
    return {
        "model": row.name,
        "path": row.model,
        "fingerprint": row.fingerprint,
        "sampler": row.sampler,
        "steps": row.steps,
        "fvd": fvd_from_stats(stats, reference.stats),
        "num_videos": n,
        **latency,
        "guidance": [config.eval.min_guidance_scale, config.eval.max_guidance_scale] if row.sampler == "svd" else None,
        "seconds_per_video": {k: seconds.get(k, 0.0) / n for k in STAGES},
        "compile_s": seconds.get("compile", 0.0),
    }


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the evaluation; returns the table rows (also written to ``workdir``)."""

    workdir = Path(workdir)
    e = config.eval
    inputs = {
        "--config.eval.sfv_model": e.sfv_model,
        "--config.eval.teacher_model": e.teacher_model,
        "--config.data.path": config.data.path,
        "--config.data.tfds_data_dir": config.data.tfds_data_dir,
    }
    if problem := output_overlaps("--workdir", workdir, inputs) or folder_problem("--workdir", workdir):
        raise EvalConfigError(problem)
    table_rows = rows(config)
    for flag in ("num_videos", "chunk_size", "batch_size", "i3d_batch_size"):
        if int(e[flag]) < 1:
            raise EvalConfigError(f"--config.eval.{flag}={e[flag]} must be >= 1")
    dtypes = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}
    if e.dtype not in dtypes:
        raise EvalConfigError(f"--config.eval.dtype={e.dtype!r}: one of {sorted(dtypes)}")
    main = jax.process_index() == 0
    progress = progress and main  # one progress bar per row, from process 0 (its share of the chunks)
    n, chunk_size = int(e.num_videos), int(e.chunk_size)
    features = I3DFeatures(batch_size=int(e.i3d_batch_size))

    # 1. the reference: conditioning frames and real statistics (process 0 builds, all read)
    ref_folder = protocol.reference_folder(config, workdir)
    if not (ref_folder / "records.json").is_file() and main:
        logging.info("reference set: %d videos of %s -> %s", n, config.data.kind, ref_folder)
        with _progress(n, "real videos", progress) as bar:
            protocol.build_reference(config, ref_folder, features, bar)
    _barrier("sfv_eval_reference")
    reference = protocol.Reference.load(ref_folder)
    if n <= FEATURE_DIM:
        logging.warning(
            "FVD from %d <= %d videos: the covariances are rank deficient; use it as a smoke test, not "
            "as a number to compare with published FVDs (2048 videos)",
            n,
            FEATURE_DIM,
        )

    # 2. rows, grouped by model: latency first (unsharded, process 0), then this process's missing chunks
    results = []
    by_model: dict[str, list[Row]] = defaultdict(list)
    for r in table_rows:
        by_model[r.model].append(r)
    for model, model_rows in by_model.items():
        folders = {r: workdir / "rows" / r.key(config) for r in model_rows}
        todo = {
            r: [
                c
                for c in protocol.my_chunks(n, chunk_size, jax.process_index(), jax.process_count())
                if not protocol.chunk_path(folders[r], c).is_file()
            ]
            for r in model_rows
        }
        latency = [r for r in model_rows if main and not (folders[r] / "latency.json").is_file()]
        if any(todo.values()) or latency:
            logging.info("loading %s (%s)", model, e.dtype)
            pipe = pretrained.load_pipeline(model, dtypes[e.dtype], progress=False)
            for r in latency:
                lat = measure_latency(
                    pipe, reference.first_frames[0], e.seed, generation_settings(config, r), int(e.latency_repeats)
                )
                logging.info(
                    "%s %d step(s): UNet %.3fs, end to end %.3fs per video",
                    r.name,
                    r.steps,
                    lat["unet_latency_s"],
                    lat["e2e_latency_s"],
                )
                write_atomic(folders[r] / "latency.json", lambda p: p.write_text(json.dumps(lat)))  # noqa: B023 (called at once)
            if any(todo.values()):
                pipe.shard()
            for r in model_rows:
                if not todo[r]:
                    continue
                with _progress(
                    sum(min(n, (c + 1) * chunk_size) - c * chunk_size for c in todo[r]),
                    f"{r.name} {r.steps} step(s)",
                    progress,
                ) as bar:
                    for c in todo[r]:
                        start, stop = protocol.chunks(n, chunk_size)[c]
                        feats, seconds, videos = generate_chunk(pipe, features, reference, config, r, start, stop)
                        protocol.write_chunk(
                            protocol.chunk_path(folders[r], c),
                            np.arange(start, stop),
                            feats,
                            seconds,
                            videos if e.keep_videos else None,
                        )
                        bar.update(stop - start)
            del pipe
        for r in model_rows:
            _barrier(f"sfv_eval_{folders[r].name}")
            result_path = folders[r] / "result.json"
            if main and not result_path.is_file():
                res = finish_row(config, r, folders[r], reference)
                write_atomic(result_path, lambda p: p.write_text(json.dumps(res, indent=1)))  # noqa: B023
            _barrier(f"sfv_eval_{folders[r].name}_result")
            results.append(json.loads(result_path.read_text()))
    if main:
        write_tables(workdir, results, config, reference)
    return results


def markdown_table(results: list[dict], config: ml_collections.ConfigDict, reference: protocol.Reference) -> str:
    e, d = config.eval, config.data
    dev = jax.local_devices()[0]
    lines = [
        f"# FVD ({e.num_videos} videos; {d.kind} {d.get('path') or d.tfds_name} split {d.split}; "
        f"{d.num_frames} frames at {e.width}x{e.height}, {d.fps:g} fps, compared at {d.width}x{d.height})",
        "",
        f"Device: {jax.device_count()} x {dev.device_kind} ({dev.platform}), {jax.process_count()} process(es); "
        f"dtype {e.dtype}. Latency: one video, batch 1, one device.",
        "",
        "| Model | Steps | FVD ↓ | UNet latency (s) | End-to-end latency (s) | Model fingerprint |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['steps']} | {r['fvd']:.1f} | {r['unet_latency_s']:.3f} | {r['e2e_latency_s']:.3f} "
        f"| `{r['fingerprint']}` |"
        for r in results
    ]
    lines += [
        "",
        "Seconds per video by stage (batched generation on every device; the reference set: read "
        f"{reference.seconds_per_video['read']:.3f}, i3d {reference.seconds_per_video['i3d']:.3f}):",
        "",
        "| Model | Steps | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    lines += [
        f"| {r['model']} | {r['steps']} | " + " | ".join(f"{r['seconds_per_video'][s]:.3f}" for s in STAGES) + " |"
        for r in results
    ]
    if int(e.num_videos) <= FEATURE_DIM:
        lines += [
            "",
            f"Note: {e.num_videos} <= {FEATURE_DIM} videos: a smoke test, not comparable with published FVDs.",
        ]
    return "\n".join(lines) + "\n"


def write_tables(
    workdir: Path, results: list[dict], config: ml_collections.ConfigDict, reference: protocol.Reference
) -> None:
    text = markdown_table(results, config, reference)
    doc = {
        "rows": results,
        "reference": {
            "folder": str(reference.folder),
            "num_videos": len(reference.records),
            "seconds_per_video": reference.seconds_per_video,
        },
        "config": json.loads(config.to_json_best_effort()),
        "devices": {
            "count": jax.device_count(),
            "kind": jax.local_devices()[0].device_kind,
            "processes": jax.process_count(),
        },
    }
    write_atomic(workdir / "fvd_table.md", lambda p: p.write_text(text))
    write_atomic(workdir / "fvd_table.json", lambda p: p.write_text(json.dumps(doc, indent=1)))
    print(text, flush=True)
