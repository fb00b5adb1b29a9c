"""The device check's CPU smoke variant (docs/benchmarks.md): ``launch/device_check.sh --smoke`` runs every part at
tiny sizes, prints the table and writes the JSON; a failing part is reported without losing the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sfv_jax.bench import check

REPO = Path(__file__).resolve().parents[1]


def test_smoke_check_runs_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "launch/device_check.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["smoke"] is True and list(report["parts"]) == list(check.PARTS)
    failed = {k: v.get("error") for k, v in report["parts"].items() if not v["ok"]}
    assert not failed, failed
    parts = report["parts"]
    for name in ("unet_cudnn", "unet_xla"):
        assert parts[name]["flax_s"] > 0 and parts[name]["torch_s"] > 0 and parts[name]["flops"] > 0
    assert set(parts["pipeline_1step"]["flax"]) == {"image_encoder", "vae_encode", "unet", "vae_decode", "total"}
    for name, objective in (("train_sfv", "sfv"), ("train_diffusion", "diffusion")):
        r = parts[name]
        assert r["objective"] == objective and r["iteration_s"] > 0 and r["planned_peak_bytes"] > 0
        assert r["model_flops"] > 0
    assert "| part | time | detail |" in proc.stdout and "check_parts=5 check_failed=0" in proc.stdout
    assert (tmp_path / "device_check.log").is_file()


def test_a_failing_part_is_reported_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("no such kernel")

    parts = check.part_args(True)
    monkeypatch.setattr(check, "part_args", lambda smoke: {**parts, "unet_cudnn": (broken, parts["unet_cudnn"][1])})
    out = tmp_path / "r.json"
    results = check.bench_check(check._args(smoke=True, parts="unet_cudnn,unet_xla", json=str(out)))
    assert results["unet_cudnn"] == {
        "ok": False,
        "error": "RuntimeError: no such kernel",
        "wall_s": results["unet_cudnn"]["wall_s"],
    }
    assert results["unet_xla"]["ok"]
    assert json.loads(out.read_text())["parts"]["unet_xla"]["ok"]
    assert "check_parts=2 check_failed=1 (unet_cudnn)" in capsys.readouterr().out
