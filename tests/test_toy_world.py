"""The toy world's builder (``python -m sfv_jax.cli.toy_world``): the VAE objective learns, the written
pipeline folder loads, its scaling factor gives unit-std latents, a rerun resumes, bad flags exit 2."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfv_jax.checkpoint import pretrained
from sfv_jax.cli import toy_world
from sfv_jax.models import build, presets
from sfv_jax.training import vae_objective

SMALL = ["--batch", "1", "--frames", "2", "--size", "16", "--eval-clips", "4", "--log-every", "2", "--save-every", "3"]


def test_vae_loss_terms():
    """MSE of the sampled reconstruction and the KL of the posterior, against numpy on the same draws."""
    vae = build.vae_from_config(presets.VAES["toy32"])
    params = vae.init(jax.random.PRNGKey(0), *build.init_args(vae))["params"]
    video = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(2)
    loss, m = vae_objective.vae_loss(vae, params, video, key, kl_weight=0.5)
    mean, logvar = vae.apply({"params": params}, video[0], method=vae.encode_moments)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    recon = np.asarray(vae.apply({"params": params}, z[None], method=vae.decode), np.float64)
    mse = np.mean((recon - np.asarray(video, np.float64)) ** 2)
    mu, lv = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    kl = 0.5 * np.mean(mu**2 + np.exp(lv) - 1 - lv)
    assert float(m["mse"]) == pytest.approx(mse, rel=1e-5) and float(m["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(mse + 0.5 * kl, rel=1e-5)


def test_toy_world_writes_a_pipeline_and_resumes(tmp_path, capsys):
    work, out = tmp_path / "vae", tmp_path / "init"
    assert toy_world.main(["--workdir", str(work), "--out", str(out), "--steps", "6", "--lr", "3e-3", *SMALL]) == 0
    log = capsys.readouterr().out
    losses = [float(line.split("mse ")[1].split()[0]) for line in log.splitlines() if line.startswith("vae step")]
    assert len(losses) == 3 and losses[-1] < losses[0], log  # it learns
    meta = json.loads((out / "sfv_jax.json").read_text())
    assert meta["component"] == "pipeline" and meta["seed"] == 0 and meta["wall_time_s"] > 0
    assert meta["command"].startswith("python -m sfv_jax.cli.toy_world --workdir")
    report = meta["vae"]
    assert np.isfinite(report["held_out_psnr_db"]) and report["held_out_clips"] == 4

    pipe = pretrained.load_pipeline(out, progress=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert pipe.unet.config.num_frames == 14 and pipe.vae_scale_factor == 4
    # the scaling factor gives the training clips' scaled latents unit std
    clips = toy_world.to_model(toy_world.clips(0, 0, 4, 2, 16))
    std = float(vae_objective.latent_std(pipe.vae, pipe.vae_params, clips)) * pipe.vae.config.scaling_factor
    assert std == pytest.approx(1.0, rel=1e-3)

    # a rerun continues from the saved state (step 6) to 8 and writes a new folder
    assert toy_world.main(["--workdir", str(work), "--out", str(tmp_path / "init2"), "--steps", "8", *SMALL]) == 0
    log = capsys.readouterr().out
    assert "resumed the VAE at step 6" in log and "vae step 8/8" in log and "vae step 2/8" not in log


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--steps", "0"], "--steps=0: must be >= 1"),
        (["--out", "EXISTING"], "exists; pass a new folder"),
        (["--workdir", "OUT/state"], "--out"),
    ],
)
def test_toy_world_bad_flags(tmp_path, capsys, flags, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    args = {"--workdir": str(tmp_path / "w"), "--out": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        args[flag] = value.replace("EXISTING", str(existing)).replace("OUT", str(tmp_path / "out"))
    argv = [x for kv in args.items() for x in kv]
    assert toy_world.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
