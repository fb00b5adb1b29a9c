"""The target table: the packaged training configs compiled for the accelerators they are meant for, on
this host and without any of them. Per target, config and train step: does it compile, its peak memory
per device from the target's own compiler, does it fit, how long the compile took.

    sfv-targets --out runs/targets                                 # every case on every target
    sfv-targets --out runs/targets --cases tiny,tiny_diffusion --targets h100,v5p
    sfv-targets --out runs/targets --table-only                    # the table of what is done so far

Each case is one ``sfv-memory --target T --mesh M --json`` process (the compiler's host memory goes back
when it ends) under ``--timeout``; its figures land in ``OUT/<target>__<case>.json``, a failure in the same
file with the error's last lines, so a rerun skips what is done. Full-size cases are heavy for the host:
one SVD train step took XLA:GPU and libtpu tens of minutes on a 2-core host (the table records the time).
The table (markdown) goes to stdout and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sfv_jax import console, paths
from sfv_jax.parallel import targets

TEACHER = Path(__file__).resolve().parents[1] / "assets" / "toy_teacher"
# case: (config, flags). Every case runs on one host's worth of devices, fsdp over all of them.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sfv_svd": ("sfv_svd", ()),
    "svd_finetune": ("svd_finetune", ()),
    "svd_finetune_temporal": ("svd_finetune", ("--config.trainable=temporal",)),
    "svd_finetune_xt": ("svd_finetune:xt", ()),
    "toy_teacher": ("toy_teacher", ()),
    "toy_sfv": ("toy_sfv", (f"--config.init_from={TEACHER}",)),
    "tiny": ("tiny", ()),
    "tiny_diffusion": ("tiny", ("--config.objective=diffusion",)),
    # the pipeline's UNet stage on one device, 1024x576x14: SF-V's single forward; the teacher's 25 guided steps
    "sample_sfv": ("sfv_svd", ("--sampler",)),
    "sample_teacher": ("svd_finetune", ("--sampler",)),
}
MESH = "fsdp=8"  # one host: 8 GPUs, a v5p-8 / v6e-8 / v5e-8 slice


def run_case(out: Path, target: str, case: str, timeout_s: float) -> dict:
    """Compile one case for one target in its own process; its record (also written to OUT)."""
    config, extra = CASES[case]
    path = out / f"{target}__{case}.json"
    cmd = [sys.executable, "-m", "sfv_jax.cli.memory", "--config", config, "--target", target]
    cmd += ([] if "--sampler" in extra else ["--mesh", MESH]) + ["--json", str(path), *extra]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        named = [ln.strip() for ln in lines if "Error" in ln or ln.startswith("error:")]  # the exception's own line
        error = None if proc.returncode == 0 else (named[-1:] or lines[-3:])
    except subprocess.TimeoutExpired:
        error = [f"not compiled within the {timeout_s:.0f}-s limit"]
    if error is not None:
        record = {"target": target, "error": error, "wall_s": time.time() - t0}
        paths.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    record = json.loads(path.read_text())
    record.update(case=case, wall_s=time.time() - t0, command=" ".join(cmd[3:]))
    paths.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str)))
    return record


def table(out: Path) -> str:
    """The markdown table of every record in ``out``."""
    rows = [
        "| target | config | step | compiles | peak GB / device | fits | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*__*.json")):
        r = json.loads(path.read_text())
        target, case = path.stem.split("__", 1)
        if "error" in r:
            rows.append(f"| {target} | {case} | all | **no**: {' '.join(r['error'])[-160:]} | | | |")
            continue
        for step, f in r["steps"].items():
            fits = "yes" if f["peak"] <= r["device_gb"] * 1e9 else "**no**"
            rows.append(
                f"| {target} | {case} | {step} | yes | {f['peak'] / 1e9:.2f} of {r['device_gb']:g} | {fits} "
                f"| {f['compile_s']:.0f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sfv-targets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder of the per-case JSON records and table.md")
    ap.add_argument("--targets", default=",".join(targets.TARGETS), help="comma-separated target names")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per case (default 3 h)")
    ap.add_argument("--table-only", action="store_true", help="print the table of what is done; compile nothing")
    args = ap.parse_args(argv)
    chosen = [t for t in args.targets.split(",") if t]
    cases = [c for c in args.cases.split(",") if c]
    bad = [t for t in chosen if t not in targets.TARGETS] + [c for c in cases if c not in CASES]
    if bad:
        return console.fail(f"--targets / --cases: unknown {', '.join(bad)}")
    if not args.timeout > 0:
        return console.fail(f"--timeout {args.timeout}: must be a positive number of seconds")
    out = Path(args.out)
    problem = paths.folder_problem("--out", out)
    if problem:
        return console.fail(problem)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        todo = [(t, c) for t in chosen for c in cases if not (out / f"{t}__{c}.json").exists()]
        for i, (target, case) in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {target} {case} ...", flush=True)
            r = run_case(out, target, case, args.timeout)
            verdict = "FAILED: " + " ".join(r["error"])[-200:] if "error" in r else "compiled"
            print(f"    {verdict} ({r['wall_s']:.0f} s)", flush=True)
    jax_version = importlib.metadata.version("jax")
    text = f"Compiled {datetime.date.today()} with jax {jax_version}, mesh {MESH}.\n\n{table(out)}\n"
    paths.write_atomic(out / "table.md", lambda tmp: tmp.write_text(text))
    print(text)
    return 0


def run() -> None:
    """The ``sfv-targets`` console script."""
    targets.prepare_environment()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())


if __name__ == "__main__":
    run()
