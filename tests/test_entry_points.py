"""The README's main job and the benchmark run end to end (smoke runs; no timing is asserted)."""

from __future__ import annotations

from sfv_jax import bench, demo


def test_demo_main_job(tmp_path, capsys):
    assert demo.main(["--workdir", str(tmp_path / "demo"), "--config", "tiny_a", "--latent", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "parity max|jax-torch|/max|torch|" in out and "OK" in out
    assert (tmp_path / "demo" / "flax_unet" / "sfv_jax.json").exists()


def test_bench_unet_runs(capsys):
    assert bench.main(["unet", "--config", "tiny_a", "--height", "64", "--width", "64", "--repeats", "1",
                       "--warmup", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("unet_flax_s=") and "ratio_flax_over_torch=" in last
