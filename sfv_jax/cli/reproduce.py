"""The toy-scale reproduction of the paper's Tables 1-3 (docs/reproduction.md): distil SF-V from a toy teacher,
evaluate every row and write a report.

    python -m sfv_jax.cli.reproduce --workdir DIR [--teacher FOLDER] [--seed S] [--train-seed T]
        [--num-videos N] [--rows real,teacher,sfv,...] [--steps K] [--guidance-steps K] [--quick | --demo]

The teacher defaults to the shipped toy teacher (``sfv_jax/assets/toy_teacher``). ``--demo`` is the
README's main job (about 9 minutes on a 2-core CPU): rows real, teacher 1, 4 and 25 steps, SF-V's one step
(200 training steps, without the training diagnostics) and the same generator with the teacher's guidance
distilled into its one unguided pass (``sfv_cfg``: 100 steps instead of the full protocol's 300), 32 videos;
the VAE's floor is left to the full protocol. With
``--demo --rows real,teacher_1,teacher_4,teacher_25,sfv_1,sfv_cfg_1,sfv_guided_1`` the report adds the SF-V
generator sampled with the teacher's guidance (two UNet evaluations; the rest is reused).

Rows (``evaluation/toy_protocol.py``): ``real`` (a second held-out real set: FVD's floor), ``vae`` (that set
through the teacher's VAE: the floor of every generated row), ``teacher`` at 1, 2, 4, 8, 16, 25 Euler steps with
guidance 1 -> 3 (``teacher_unguided``: 4 and 25 without), ``sfv_guided`` (the toy default's one step with the
teacher's guidance, not in the paper), ``sfv`` (the toy default: the paper's method without the reconstruction
term, with temporal heads only and half of the generator's updates at sigma_max) at 1, 2, 3 steps, ``sfv_paper``
(the paper's values: lambda 0.1, both heads, uniform levels), and the ablations at one step: ``sfv_both_heads``
/ ``sfv_spatial`` heads, (P_mean, P_std) ``sfv_p-2_-1`` / ``sfv_p0_1`` / ``sfv_p1_1`` (``sfv`` is (-1, -1)),
``sfv_recon_only`` (no adversarial term), ``sfv_with_recon`` (lambda 0.1) and the R1 variants ``sfv_r1_none`` /
``_paper`` / ``_approx`` (``sfv``: features); beyond the paper: the R1 weight (``sfv_r1_g10`` / ``_g100`` /
``_g1000``: gamma 10, 100, 1000 instead of 1e-5), the method fixes (``sfv_spread``:
``disc.cond_embedding=spread``; ``sfv_warmup0``: SM3 without warm-up), the heads at the paper's size
(``sfv_heads128``), the adversarial game's levers (``sfv_uniform`` / ``sfv_top100``: the generator's levels
uniform or all at sigma_max, ``sfv_sn``, ``sfv_d2``, ``sfv_conv_in``, ``sfv_conv_in_sn``, the optimizer
``sfv_adam``, the batch ``sfv_b16``), ADD's teacher term (``sfv_distill``), the toy default's generator with the
teacher's guidance distilled into its one unguided pass (``sfv_cfg``, trained after ``sfv``, from its export) and
the previous default (``sfv_both_uniform``). Each SF-V row's run is ``configs/toy_sfv.py`` with its overrides,
from the teacher, for ``--steps`` iterations (default the config's; ``--guidance-steps`` for ``sfv_cfg``),
trained in ``DIR/train/<run>`` and exported to ``DIR/models/<run>``. ``--seed`` fixes the protocol (the clips,
conditioning frames and noise) and, by default, the runs' training seed; ``--train-seed`` trains the runs with
another one under the same protocol (repeats of one row, to measure run-to-run spread: one workdir per training
seed, the real and teacher rows copied or recomputed).

Writes ``DIR/report.md``, ``DIR/report.json`` (``{"seed", "train_seed", "num_videos", "rows": [{"name", "steps",
"fvd", "motion", "sharpness", "colour", "frame0_psnr", ...}]}``) and ``DIR/grids/<row>.png`` (the first 4 videos,
one per grid row), and, once teacher 1 / 25 steps and SF-V 1 step are evaluated, ``DIR/side_by_side.mp4``
and ``.gif`` (conditioning frame | teacher 1 step | teacher 25 steps | SF-V 1 step, 4 videos; the SF-V
column is ``sfv_1``, or the first one-step SF-V variant of ``--rows`` without it).
Resumable: training runs resume from their checkpoints, finished exports and rows (``DIR/rows/<row>.json``,
the first videos in ``<row>.npy``) are kept, so a killed run recomputes only what is missing. A rerun must
ask for the same seed, video count and teacher (``DIR/protocol.json``) and, for each finished SF-V run, the
same settings and steps (its ``DIR/train/<run>/config.json``); otherwise it is refused before writing. ``--quick``: a
smoke-sized run (8 videos, 4 training steps) that checks the machinery, not the method.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

from sfv_jax import console
from sfv_jax.checkpoint import pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.configs import toy_sfv
from sfv_jax.data import video_io
from sfv_jax.evaluation import toy_protocol as tp
from sfv_jax.evaluation.fvd import FeatureStats, I3DFeatures
from sfv_jax.paths import OutputLock, folder_problem, output_overlaps, write_atomic
from sfv_jax.training import export, trainer
from sfv_jax.training.run_config import ConfigError, saved_conflicts

GRID_VIDEOS = 4
SIDE_BY_SIDE = ("teacher_1", "teacher_25")  # after the conditioning frame, then the run's SF-V one step
# the main job within 10 minutes on 2 cores: 200 SF-V steps and 100 of guidance distillation, 9.2 min measured
# (docs/reproduction.md#the-main-job); the full protocol trains 300 + 300
DEMO = {
    "rows": "real,teacher_1,teacher_4,teacher_25,sfv_1,sfv_cfg_1",
    "num_videos": 32,
    "steps": 200,
    "guidance_steps": 100,
}
# the side-by-side's columns after SF-V's one step, where the rows have them
EXTRA_COLUMNS = {"sfv_cfg_1": "SF-V 1 step, guidance distilled", "sfv_guided_1": "SF-V 1 step, guided"}


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def run_config(
    name: str, teacher: Path, seed: int, steps: int | None, diagnostics: bool = True
) -> ml_collections.ConfigDict:
    """SF-V run ``name``'s config: ``configs/toy_sfv.py`` with the run's overrides (``toy_protocol.RUNS``).
    ``diagnostics=False`` (the main job) skips the training's held-out grip and its sample at the end,
    70-90 s of a 300-step run on 2 cores; neither changes what is trained (both are resume-safe settings)."""
    config = toy_sfv.get_config()
    config.update_from_flattened_dict({**tp.RUNS[name], "init_from": str(teacher), "seed": seed})
    if steps is not None:
        config.total_steps = steps
        config.checkpoint_every_steps = min(config.checkpoint_every_steps, steps)
        config.sample_every_steps = steps
    if not diagnostics:
        config.heldout_every_steps = config.sample_every_steps = 0
    return config


def train_run(
    workdir: Path,
    name: str,
    teacher: Path,
    seed: int,
    steps: int | None,
    diagnostics: bool = True,
    guidance_steps: int | None = None,
) -> Path:
    """Train (or resume) SF-V run ``name`` and export its EMA generator; returns the pipeline folder. A run
    with a start in ``toy_protocol.RUN_STARTS`` trains that run first and starts from its export. ``steps``:
    every run's step count (None: its config's); ``guidance_steps``, where given, that of the guidance-distillation
    runs (objective "guidance") instead."""
    out = workdir / "models" / name
    if start := tp.RUN_STARTS.get(name):
        teacher = train_run(workdir, start, teacher, seed, steps, diagnostics, guidance_steps)
    if guidance_steps is not None and tp.RUNS[name].get("objective") == "guidance":
        steps = guidance_steps
    config = run_config(name, teacher, seed, steps, diagnostics)
    if out.is_dir():
        check_trained_run(workdir / "train" / name, config)
        return out
    t0 = time.time()
    print(f"[reproduce] training {name} ({config.total_steps} steps) in {workdir / 'train' / name}", flush=True)
    trainer.train(config, workdir / "train" / name)
    export.export_run(workdir / "train" / name, out)
    print(f"[reproduce] {name}: trained and exported in {time.time() - t0:.0f} s", flush=True)
    return out


def check_trained_run(train_dir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuse a finished run whose saved config (``train_dir/config.json``) is not ``config``: another seed,
    teacher or step count, or a run whose overrides (or the toy config's defaults) changed since. Its export
    and rows would otherwise be reused under the new meaning."""
    # total_steps may change when a run resumes, not once it is exported
    if conflicts := saved_conflicts(train_dir, config, also=("total_steps",)):
        raise ConfigError(
            f"{train_dir} was trained and exported with other settings than this command asks for (its rows "
            "would be reused under another meaning; nothing was written; use another --workdir):\n  "
            + "\n  ".join(conflicts)
        )


def evaluate_row(workdir: Path, row: tp.Row, pipes: dict, model: Path | None, args, features, real, real_stats) -> dict:
    """The row's metrics (cached in ``DIR/rows``). ``pipes``: the loaded pipeline of each model folder, shared
    by its rows (the teacher's six reuse one pipeline; the SF-V runs' exports, whose modules are equal, share
    their compiled stages)."""
    path = workdir / "rows" / f"{row.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.time()
    if model is not None and model not in pipes:
        pipes[model] = pretrained.load_pipeline(model, progress=False)
    if row.kind in ("real", "vae"):
        videos = tp.reference_clips(args.seed, args.num_videos, held_out=True)
        if row.kind == "vae":
            videos = tp.reconstruct(pipes[model], videos)
    else:
        videos = tp.generate(pipes[model], row, real[:, 0], tp.noise_seeds(args.seed, args.num_videos))
    result = {
        "name": row.name,
        "steps": row.steps,
        "run": row.run,
        **tp.row_metrics(videos, real, features, real_stats),
    }
    if row.kind in ("real", "vae"):
        result["frame0_psnr"] = None  # other clips: no conditioning frame to compare with
    result["wall_s"] = round(time.time() - t0, 1)
    grid = video_io.frame_grid(list(videos[:GRID_VIDEOS]))
    video_io.write_video(workdir / "grids" / f"{row.key}.png", grid[None])
    buf = io.BytesIO()
    np.save(buf, videos[:GRID_VIDEOS])
    write_atomic(workdir / "rows" / f"{row.key}.npy", lambda p: p.write_bytes(buf.getvalue()))
    _write_json(path, result)
    print(
        f"[reproduce] {row.key}: FVD {result['fvd']:.1f}, motion {result['motion']:.3f}, sharpness "
        f"{result['sharpness']:.3f}, colour {result['colour']:.3f} ({result['wall_s']:.0f} s)",
        flush=True,
    )
    return result


def side_by_side(workdir: Path, real, rows: list[tp.Row]) -> list[Path]:
    """``DIR/side_by_side.mp4`` and ``.gif`` from the cached first videos of the SIDE_BY_SIDE rows and of
    the run's SF-V one step (``sfv_1``, else the first one-step SF-V variant among ``rows``), then the
    EXTRA_COLUMNS that ``rows`` has, 4x upscaled; [] while one of them is missing."""
    columns = side_by_side_columns(rows)
    paths = [workdir / "rows" / f"{key}.npy" for key in (*SIDE_BY_SIDE, *columns)]
    if not columns or not all(p.is_file() for p in paths):
        return []
    cond = real[:GRID_VIDEOS, :1]  # the conditioning frames, as 1-frame videos
    grid = video_io.video_grid([cond, *(np.load(p) for p in paths)], scale=4)
    return [video_io.write_video(workdir / f"side_by_side{ext}", grid, fps=tp.FPS) for ext in (".mp4", ".gif")]


def side_by_side_columns(rows: list[tp.Row]) -> list[str]:
    """The SF-V row keys of the side-by-side, in order: the run's one step, then EXTRA_COLUMNS; [] without one."""
    one_step = [r.key for r in rows if r.kind == "sfv" and r.steps == 1]
    sfv = "sfv_1" if "sfv_1" in one_step else next(iter(one_step), None)
    return [] if sfv is None else [sfv, *(k for k in EXTRA_COLUMNS if k in one_step and k != sfv)]


def _optional(value: float | None, spec: str) -> str:
    """``value`` formatted, "-" for None (no conditioning frame; a row cached before its metric existed)."""
    return "-" if value is None else format(value, spec)


def report_markdown(results: list[dict], args, command: str, wall_s: float) -> str:
    lines = [
        f"# SF-V toy-scale reproduction (seed {args.seed}, {args.num_videos} videos per row"
        + (f"; SF-V runs trained with seed {args.train_seed})" if args.train_seed != args.seed else ")"),
        "",
        f"Command: `{command}` ({wall_s / 60:.1f} min). FVD with the project's I3D (frames resized to 224) "
        f"against {args.num_videos} held-out real clips; motion, sharpness and the last frame's colourfulness "
        "are ratios to the real clips' (1 = real; motion ~0: the video does not move; colour < 1: greyish); "
        "frame-0 PSNR against the conditioning frame.",
        "",
        "| row | steps | FVD ↓ | motion | sharpness | colour | frame-0 PSNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['steps']} | {r['fvd']:.1f} | {r['motion']:.3f} | {r['sharpness']:.3f} "
        f"| {_optional(r.get('colour'), '.3f')} | {_optional(r['frame0_psnr'], '.1f')} |"
        for r in results
    ]
    if args.num_videos <= 400:
        lines += ["", f"FVD from {args.num_videos} <= 400 videos: rank-deficient covariances; compare rows only."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the ``--quick`` / ``--demo`` defaults resolved (``num_videos`` always set)."""
    p = argparse.ArgumentParser(
        prog="python -m sfv_jax.cli.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--teacher",
        default=str(tp.TOY_TEACHER),
        help="the toy teacher's pipeline folder (an export of configs/toy_teacher.py; default: the shipped one)",
    )
    p.add_argument("--seed", type=int, default=0, help="the protocol's seed (clips, noise) and the runs' (default 0)")
    p.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="the SF-V runs' training seed (default: --seed); the protocol stays --seed's",
    )
    p.add_argument("--num-videos", type=int, default=None, help="videos per row (default 256; --quick 8, --demo 32)")
    p.add_argument("--rows", default=None, help="comma-separated row names or name_steps (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of each SF-V run (default: toy_sfv's)")
    p.add_argument(
        "--guidance-steps",
        type=int,
        default=None,
        help="training steps of the guidance-distillation stage (sfv_cfg) instead (default: --steps; --demo 100)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke size: 8 videos, 4 training steps")
    size.add_argument(
        "--demo",
        action="store_true",
        help=f"the main job: rows {DEMO['rows']}, {DEMO['num_videos']} videos, {DEMO['steps']} SF-V steps, "
        f"{DEMO['guidance_steps']} guidance-distillation steps (each unless given)",
    )
    args = p.parse_args(argv)
    default_videos = 256
    if args.quick:
        default_videos, args.steps = 8, args.steps or 4
        args.num_videos = None if args.num_videos is None else min(args.num_videos, 8)
    if args.demo:
        default_videos = DEMO["num_videos"]
        args.rows, args.steps = args.rows or DEMO["rows"], args.steps or DEMO["steps"]
        args.guidance_steps = args.guidance_steps or DEMO["guidance_steps"]
    args.num_videos = default_videos if args.num_videos is None else args.num_videos
    args.train_seed = args.seed if args.train_seed is None else args.train_seed
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir, teacher = Path(args.workdir).absolute(), Path(args.teacher)
    try:
        rows = tp.select_rows(args.rows.split(",") if args.rows else None)
    except ValueError as e:
        return console.fail(f"--rows: {e}")
    if args.num_videos < 2:
        return console.fail(f"--num-videos={args.num_videos}: must be >= 2")
    for flag, value in (("--steps", args.steps), ("--guidance-steps", args.guidance_steps)):
        if value is not None and value < 1:
            return console.fail(f"{flag}={value}: must be >= 1")
    if not (teacher / "model_index.json").is_file():
        return console.fail(f"--teacher {teacher}: not a pipeline folder (no model_index.json)")
    if problem := output_overlaps("--workdir", workdir, {"--teacher": teacher}) or folder_problem("--workdir", workdir):
        return console.fail(problem)
    command = "python -m sfv_jax.cli.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    with OutputLock(workdir, "--workdir", command="sfv-reproduce"):
        return _reproduce(args, rows, workdir, teacher, command)


def check_protocol(workdir: Path, protocol: dict) -> None:
    """``DIR/protocol.json`` holds the seed, video count and teacher of the rows kept in ``DIR``; a command
    that asks for others is refused before anything is written (its cached rows would be mixed in)."""
    path = workdir / "protocol.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--workdir {workdir}: {path.name} cannot be read ({e})") from None
        if diff := [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in protocol.items() if saved.get(k) != v]:
            raise ConfigError(
                f"--workdir {workdir} holds rows made with another protocol (nothing was written; use another "
                "--workdir):\n  " + "\n  ".join(diff)
            )
    else:
        _write_json(path, protocol)


def _reproduce(args: argparse.Namespace, rows: list, workdir: Path, teacher: Path, command: str) -> int:
    t0 = time.time()
    try:
        check_protocol(workdir, {"seed": args.seed, "num_videos": args.num_videos, "teacher": str(teacher.absolute())})
        real = tp.reference_clips(args.seed, args.num_videos)
        features = I3DFeatures()
        stats_path = workdir / "reference" / f"real_stats_{args.seed}_{args.num_videos}.npz"
        if not stats_path.is_file():
            print(f"[reproduce] I3D statistics of the {args.num_videos} reference clips (once per workdir)", flush=True)
            stats_path.parent.mkdir(parents=True, exist_ok=True)
            FeatureStats.of(features(real)).save(stats_path)
        real_stats = FeatureStats.load(stats_path)
        results, pipes = [], {}
        for row in rows:
            model = teacher if row.kind in ("teacher", "vae") else None
            if row.kind == "sfv":
                model = train_run(
                    workdir, row.run, teacher, args.train_seed, args.steps, not args.demo, args.guidance_steps
                )
            results.append(evaluate_row(workdir, row, pipes, model, args, features, real, real_stats))
    except (ConfigError, CheckpointError, video_io.VideoError) as e:
        return console.fail(e)
    wall = time.time() - t0
    report = {
        "seed": args.seed,
        "train_seed": args.train_seed,
        "num_videos": args.num_videos,
        "command": command,
        "wall_s": round(wall, 1),
    }
    _write_json(workdir / "report.json", {**report, "rows": results})
    text = report_markdown(results, args, command, wall)
    write_atomic(workdir / "report.md", lambda p: p.write_text(text))
    videos = side_by_side(workdir, real, rows)
    print(text)
    print(f"[reproduce] wrote {workdir / 'report.md'}, {workdir / 'report.json'} and {workdir / 'grids'}")
    if videos:
        extra = "".join(f" | {EXTRA_COLUMNS[k]}" for k in side_by_side_columns(rows)[1:])
        columns = f"conditioning | teacher 1 step | teacher 25 steps | SF-V 1 step{extra}"
        print(f"[reproduce] side by side ({columns}): {videos[0]}")
    return 0


def run() -> None:
    """The console script."""
    console.run_main(main)


if __name__ == "__main__":
    run()
