"""SVD's diffusion objective in the trainer: the loss against float64 numpy, the sigma
distribution, conditioning dropout (equal to the teacher sampler's unconditional inputs), per-sample
noise augmentation reaching ``added_time_ids``, accumulation, ``trainable=temporal``, the optimizers,
and that a short run learns (held-out denoising loss at fixed sigmas)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_time_bound_env, tensorboard_scalars

from sfv_jax.configs import svd_finetune, tiny
from sfv_jax.data import clips, video_io
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.loader import Loader
from sfv_jax.diffusion.pipeline import velocity_fn
from sfv_jax.models.build import abstract_params
from sfv_jax.parallel import sharding
from sfv_jax.training import layout, losses, objectives, param_groups, trainer
from sfv_jax.training.checkpoints import checkpoint_manager, restore
from sfv_jax.training.layout import build_modules, frozen_encoders, init_params, init_train_state, make_layout

REPO = Path(__file__).resolve().parents[1]
DIFF = objectives.DiffusionConfig(p_mean=0.7, p_std=1.6, drop_embed=0.1, drop_both=0.2, drop_latent=0.15)


class StubUNet(nn.Module):
    """A stand-in for the UNet with SVD's call signature: out = tanh(a * sample[..., :4] + b * sample[..., 4:]
    + c * c_noise + mean(embeds) + sum(ids) / 100)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample, c_noise, embeds, ids):
        a, b, c = (self.param(n, lambda k, v=v: jnp.float32(v)) for n, v in (("a", 0.7), ("b", -0.3), ("c", 0.2)))
        c_noise = jnp.reshape(c_noise, (-1, 1, 1, 1, 1))
        extra = jnp.mean(embeds, axis=(1, 2)).reshape(-1, 1, 1, 1, 1) + jnp.sum(ids, axis=1).reshape(-1, 1, 1, 1, 1)
        return jnp.tanh(a * sample[..., :4] + b * sample[..., 4:] + c * c_noise + extra / 100)


def _stub_numpy(x_in, lat, c_noise, embeds, ids):
    extra = embeds.mean(axis=1)[:, None, None, None, None] + ids.sum(axis=1)[:, None, None, None, None]
    return np.tanh(0.7 * x_in + -0.3 * lat[:, None] + 0.2 * c_noise[:, None, None, None, None] + extra / 100)


def _micro(rng: np.random.Generator, m: int = 6, f: int = 3, hw: int = 4, d: int = 5) -> dict:
    return {
        "latents": rng.normal(size=(m, f, hw, hw, 4)).astype(np.float32),
        "image_latents": rng.normal(size=(m, hw, hw, 4)).astype(np.float32),
        "image_embeds": rng.normal(size=(m, d)).astype(np.float32),
        "added_time_ids": np.tile(np.float32([[6.0, 127.0, 0.02]]), (m, 1)),
        "index": np.arange(m, dtype=np.int32) + 11,
    }


def _stub_models():
    return objectives.Models(StubUNet(), None)


def _cfg(diffusion=DIFF):
    c = tiny.get_config()
    c.objective = "diffusion"
    return dataclasses.replace(objectives.StepConfig.from_config(c), diffusion=diffusion)


def test_loss_equals_float64_numpy():
    """The loss of one micro-batch equals a float64 numpy computation from the same x0, sigma, eps,
    dropout draws and conditioning, with a stub network in place of the UNet."""
    micro = _micro(np.random.default_rng(0))
    key = jax.random.PRNGKey(3)
    cfg = _cfg()
    params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.3), "c": jnp.float32(0.2)}
    loss, metrics = objectives.diffusion_loss_fn(params, micro, {}, {}, {}, key, models=_stub_models(), cfg=cfg)
    n = jax.tree.map(np.asarray, objectives.diffusion_noise(key, micro["index"], micro["latents"].shape[1:], DIFF))
    x0 = micro["latents"].astype(np.float64)
    sigma, eps = n["sigma"].astype(np.float64), n["eps"].astype(np.float64)
    s = sigma[:, None, None, None, None]
    x_t = x0 + s * eps
    lat = np.where(n["drop_latent"][:, None, None, None], 0.0, micro["image_latents"].astype(np.float64))
    emb = np.where(n["drop_embed"][:, None], 0.0, micro["image_embeds"].astype(np.float64))
    v = _stub_numpy(
        x_t / np.sqrt(s * s + 1), lat, 0.25 * np.log(sigma), emb, micro["added_time_ids"].astype(np.float64)
    )
    denoised = x_t / (s * s + 1) + v * (-s / np.sqrt(s * s + 1))
    weight = (sigma * sigma + 1) / (sigma * sigma)
    want = np.mean(weight * np.mean(((denoised - x0) ** 2).reshape(len(sigma), -1), axis=1))
    assert abs(float(loss) - want) <= 1e-6 * abs(want), (float(loss), want)
    assert float(metrics["g_loss"]) == float(loss)


def test_sigma_distribution_median():
    """ln sigma ~ N(P_mean, P_std^2): over 20000 per-sample draws the median is exp(P_mean) (standard
    error of the log-median: 1.6 * sqrt(pi / 2 / 20000) = 0.014; bound 0.06) and the log-std P_std."""
    n = objectives.diffusion_noise(jax.random.PRNGKey(0), jnp.arange(20000), (1,), DIFF)
    log_sigma = np.log(np.asarray(n["sigma"], np.float64))
    assert abs(np.median(log_sigma) - 0.7) < 0.06, np.median(log_sigma)
    assert abs(np.std(log_sigma) - 1.6) < 0.05, np.std(log_sigma)
    direct = np.log(np.asarray(losses.sample_training_sigma(jax.random.PRNGKey(1), (20000,), -1.2, 0.5)))
    assert abs(np.median(direct) + 1.2) < 0.03


def test_dropout_frequencies_and_null_condition():
    """The three dropout outcomes occur at their configured rates (within 4 binomial standard errors), and
    a dropped sample's conditioning is bitwise what the teacher sampler's unconditional branch gets."""
    m = 20000
    n = objectives.diffusion_noise(jax.random.PRNGKey(5), jnp.arange(m), (1,), DIFF)
    de, dl = np.asarray(n["drop_embed"]), np.asarray(n["drop_latent"])
    for got, p in (((de & ~dl).mean(), 0.1), ((de & dl).mean(), 0.2), ((~de & dl).mean(), 0.15)):
        assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / m), (got, p)
    none = objectives.diffusion_noise(
        jax.random.PRNGKey(5),
        jnp.arange(1000),
        (1,),
        dataclasses.replace(DIFF, drop_embed=0.0, drop_both=0.0, drop_latent=0.0),
    )
    assert not np.asarray(none["drop_embed"]).any() and not np.asarray(none["drop_latent"]).any()

    # the teacher sampler's unconditional inputs: a stub UNet that returns what it is given, guidance 0
    rng = np.random.default_rng(1)
    b, f, hw, d = 2, 3, 4, 5
    lat = jnp.asarray(rng.normal(size=(b, f, hw, hw, 4)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(b, 1, d)), jnp.float32)
    ids = jnp.asarray(rng.normal(size=(b, 3)), jnp.float32)

    class Echo(nn.Module):
        @nn.compact
        def __call__(self, sample, c_noise, embeds, ids):
            return jnp.concatenate([sample, jnp.broadcast_to(embeds[:, :, None, None], (*sample.shape[:4], d))], -1)

    velocity = velocity_fn(Echo(), {}, lat, emb, ids, jnp.zeros((f,), jnp.float32))
    uncond = velocity(jnp.zeros((b, f, hw, hw, 4)), jnp.float32(0.0))  # guidance 0: the unconditional half
    cond = {"image_latents": lat[:, 0], "image_embeds": emb[:, 0], "added_time_ids": ids}
    dropped = losses.drop_conditions(cond, jnp.ones(b, bool), jnp.ones(b, bool))
    np.testing.assert_array_equal(np.asarray(uncond[:, 0, ..., 4:8]), np.asarray(dropped["image_latents"]))
    np.testing.assert_array_equal(np.asarray(uncond[:, 0, 0, 0, 8:]), np.asarray(dropped["image_embeds"]))
    assert np.asarray(dropped["image_latents"]).tobytes() == np.zeros((b, hw, hw, 4), np.float32).tobytes()
    np.testing.assert_array_equal(dropped["added_time_ids"], ids)
    kept = losses.drop_conditions(cond, jnp.zeros(b, bool), jnp.array([True, False]))
    np.testing.assert_array_equal(kept["image_embeds"], cond["image_embeds"])
    np.testing.assert_array_equal(kept["image_latents"][1], cond["image_latents"][1])


def test_noise_augmentation_reaches_added_time_ids():
    """``data.noise_aug="lognormal"``: every sample gets its own strength (median exp(-3.0)), from its
    global position only; the encoder adds it to the conditioning frame and writes it into
    ``added_time_ids``."""
    strengths = clips.noise_aug_strengths("lognormal", 0.02, -3.0, 0.5, 0, np.arange(4000))
    assert abs(np.median(np.log(strengths)) + 3.0) < 0.05 and len(np.unique(strengths)) > 3990  # float32 ties aside
    np.testing.assert_array_equal(strengths[7:9], clips.noise_aug_strengths("lognormal", 0.02, -3.0, 0.5, 0, [7, 8]))
    assert (clips.noise_aug_strengths("fixed", 0.02, -3.0, 0.5, 0, [1, 2]) == np.float32(0.02)).all()

    config = tiny.get_config()
    config.data.noise_aug = "lognormal"
    lay = make_layout(config, sharding.Plan.from_config(config), *build_modules(config))
    vae_params, clip_params = frozen_encoders(config, lay.vae, lay.clip, jax.random.PRNGKey(config.seed))
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    batch = trainer.make_batch(config, encoder, 5)  # positions 5, 6 ([k=2, m=1])
    want = clips.noise_aug_strengths("lognormal", 0.02, -3.0, 0.5, config.seed, [5, 6])
    np.testing.assert_array_equal(batch["added_time_ids"][:, 0, 2], want)
    # the conditioning latent is the encoding of frame 0 + that strength x noise: per-sample strengths
    # give what encoding each sample alone with its own strength gives
    loader_frames = Loader(config, encoder).examples
    frames = np.stack([loader_frames[p]["frames"] for p in (5, 6)])
    each = [
        encoder(frames[i : i + 1], np.array([5 + i]), fps=7, motion_bucket_ids=[127.0], noise_aug_strength=want[i])
        for i in range(2)
    ]
    for i in range(2):  # (a batch of 2 and of 1 are different VAE programs: float32 round-off)
        np.testing.assert_allclose(batch["image_latents"][i, 0], each[i]["image_latents"][0], rtol=1e-5, atol=1e-6)
    other = encoder(frames[:1], np.array([5]), fps=7, motion_bucket_ids=[127.0], noise_aug_strength=0.5)
    assert np.abs(other["image_latents"][0] - batch["image_latents"][0, 0]).max() > 1e-3


def test_optimizer_per_objective():
    """AdamW is the diffusion objective's default and SM3 SF-V's; either is selectable; the warm-up scales
    update n by n / warmup_steps; clipping rescales the gradient before the optimizer."""
    c = tiny.get_config()
    assert layout.optimizer_name(c) == "sm3"
    c.objective = "diffusion"
    assert layout.optimizer_name(c) == "adamw"
    c.opt.optimizer = "sm3"
    assert layout.optimizer_name(c) == "sm3"
    c.opt.optimizer, c.opt.generator_lr, c.opt.warmup_steps, c.opt.weight_decay = "adamw", 0.1, 4, 0.0
    tx = layout.make_optimizer(c, c.opt.generator_lr)
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.array([0.5, -2.0, 1e-3])}
    state = tx.init(params)
    for n in (1, 2):  # Adam's bias-corrected first steps are lr_n * g / |g| (eps aside)
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -0.1 * n / 4 * np.sign(grads["w"]), rtol=1e-4)
    c.opt.warmup_steps, c.opt.clip_norm = 0, 1.0
    clipped = layout.make_optimizer(c, 0.1)
    c.opt.clip_norm = None
    plain = layout.make_optimizer(c, 0.1)
    big = {"w": jnp.array([30.0, -40.0, 0.0])}  # norm 50 -> clipped to norm 1
    small = {"w": jnp.array([0.3, 0.4, 0.0])}
    sc, sp, pre = clipped.init(params), plain.init(params), plain.init(params)
    _, sc = clipped.update(big, sc, params)
    _, pre = plain.update(jax.tree.map(lambda g: g / 50.0, big), pre, params)
    _, sp = plain.update(big, sp, params)
    u_clipped, _ = clipped.update(small, sc, params)
    u_pre, _ = plain.update(small, pre, params)
    u_plain, _ = plain.update(small, sp, params)
    np.testing.assert_allclose(u_clipped["w"], u_pre["w"], rtol=1e-6)
    assert np.abs(u_clipped["w"] - u_plain["w"]).max() > 1e-3


def test_temporal_selection_on_full_svd():
    """``trainable=temporal`` on full SVD and SVD-XT (eval_shape only): the temporal res blocks, temporal
    transformer blocks, frame-position embeddings and mixers, and nothing else."""
    c = svd_finetune.get_config("xt")
    c.model.attention_impl = "chunked"  # (cuDNN: GPUs only)
    assert c.data.num_frames == 25 and c.model.unet["num_frames"] == 25
    unet = build_modules(c)[0]
    abstract = abstract_params(unet)
    trained, frozen = param_groups.split(abstract, "temporal")
    count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trained)[0]]
    assert all(any(m in p for m in param_groups.TEMPORAL_MARKERS) for p in paths)
    frozen_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0]]
    assert not any(m in p for p in frozen_paths for m in param_groups.TEMPORAL_MARKERS)
    assert count(trained) + count(frozen) == 1_524_623_082  # SVD's UNet (XT: the same weights)
    assert 0.3 < count(trained) / 1_524_623_082 < 0.5, count(trained)
    assert param_groups.merge(trained, frozen).keys() == abstract.keys()


def test_svd_xt_diffusion_step_at_full_size():
    """SVD-XT (25 frames) at 1024x576 through the whole diffusion step, abstractly (``jax.eval_shape`` of
    the accumulated gradient on one device): gradients shaped like the trained parameters, one loss."""
    c = svd_finetune.get_config("xt")
    c.model.attention_impl = "chunked"  # (cuDNN: GPUs only)
    c.mesh.fsdp = 1
    lay = make_layout(c, sharding.Plan.from_config(c), *build_modules(c))
    batch = lay.abstract_batch(c)
    assert batch["latents"].shape == (1, 1, 25, 72, 128, 4)
    grads, metrics = jax.eval_shape(lay.steps(c).g_grads, lay.abstract_state, batch, {})
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, lay.abstract_state.generator)
    assert metrics["g_loss"].shape == ()


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _rel(got, want) -> float:
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    num = max(np.abs(got[k].astype(np.float64) - want[k]).max() for k in want)
    return float(num / max(np.abs(want[k].astype(np.float64)).max() for k in want))


def _diffusion_config(**kw):
    """The tiny world at SVD-XT's 25 frames, diffusion objective, temporal layers only."""
    c = tiny.get_config()
    c.objective, c.trainable, c.data.noise_aug = "diffusion", "temporal", "lognormal"
    c.data.num_frames = c.model.unet.num_frames = 25
    for k, v in kw.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def temporal_run():
    """One diffusion step (temporal layers only) of the tiny config at 25 frames (SVD-XT's count): k = 2
    micro-batches of 1, and the gradient of the same 2 samples as one micro-batch of 2."""
    config = _diffusion_config()
    key = jax.random.PRNGKey(config.seed)
    lay = make_layout(config, sharding.Plan.from_config(config), *build_modules(config))
    unet_params, vae_params, clip_params, head_params, backbone = init_params(config, lay, key)
    state0 = init_train_state(lay, unet_params, head_params, jax.random.fold_in(key, 3))
    host0 = jax.tree.map(np.array, state0)
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    batch = trainer.make_batch(config, encoder, 0)  # [k=2, m=1]
    steps = lay.steps(config)
    grads, metrics = steps.g_grads(state0, batch, backbone)
    one = _diffusion_config(accum_steps=1, micro_batch=2)
    lay1 = make_layout(one, sharding.Plan.from_config(one), *build_modules(one))
    big = {k: v.reshape(1, -1, *v.shape[2:]) for k, v in batch.items()}
    grads1, metrics1 = lay1.steps(one).g_grads(state0, big, backbone)
    state1, _ = steps.g_update(state0, grads, metrics)
    return {
        "unet_params": jax.tree.map(np.asarray, unet_params),
        "state0": host0,
        "state1": jax.tree.map(np.asarray, state1),
        "grads": (grads, metrics),
        "grads_one_batch": (grads1, metrics1),
    }


TEMPORAL_RUN = pytest.mark.xdist_group("temporal_run")  # one worker computes the fixture


@TEMPORAL_RUN
def test_micro_batches_equal_one_batch(temporal_run):
    """2 accumulated micro-batches of 1 equal one micro-batch of 2 (per-sample noise and dropout from
    fold_in of the sample index): loss and gradients <= 1e-5."""
    (g, m), (g1, m1) = temporal_run["grads"], temporal_run["grads_one_batch"]
    assert _rel(g, g1) <= 1e-5, _rel(g, g1)
    assert abs(float(m["g_loss"]) - float(m1["g_loss"])) <= 1e-5 * abs(float(m1["g_loss"]))


@TEMPORAL_RUN
def test_temporal_trains_only_temporal_layers(temporal_run):
    """``trainable=temporal``: gradients, optimizer state and EMA exist for the temporal layers only; after
    a step every other parameter is bitwise what it was, every temporal one has moved."""
    s0, s1, full0 = temporal_run["state0"], temporal_run["state1"], temporal_run["unet_params"]
    want_train, want_frozen = param_groups.split(full0, "temporal")
    grads = _flat(temporal_run["grads"][0])
    assert grads.keys() == _flat(want_train).keys()
    opt = _flat(s1.gen_opt)  # AdamW: mu and nu per trained parameter, one step count
    assert {k for k in opt if ".mu" in k} == {f"[0].mu{k}" for k in grads}, list(opt)[:3]
    assert sum(x.size for x in opt.values()) == 2 * sum(x.size for x in grads.values()) + 1
    assert _flat(s1.ema).keys() == grads.keys()
    assert s1.heads == {} and all(x.size == 1 for x in jax.tree.leaves(s1.disc_opt))  # no discriminator
    frozen0, frozen1 = _flat(want_frozen), _flat(s1.frozen)
    assert frozen0.keys() == frozen1.keys() and len(frozen0) > 100
    assert all(np.array_equal(frozen0[k], frozen1[k]) for k in frozen0)
    before, after = _flat(s0.generator), _flat(s1.generator)
    moved = sum(not np.array_equal(before[k], after[k]) for k in before) / len(before)
    assert moved > 0.95, moved
    assert int(s1.step) == 1
    # the merged tree is the UNet's again, with the frozen leaves bitwise the initial ones
    merged = _flat(s1.unet_params())
    assert merged.keys() == _flat(full0).keys()


# ------------------------------------------------------------------------------------- a short training run

# the run the learning, resume and CLI tests share: the tiny world, the diffusion objective, all parameters
RUN_STEPS, RESUME_FROM = 60, 40
HELD_OUT_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
HELD_OUT_POSITION = 1_000_000  # synthetic clips far from the training positions (0 .. 2 x RUN_STEPS)
LEARN_RATIO = 0.75  # held-out loss after RUN_STEPS <= 0.75 x before (measured: docs/training.md, "Fine-tuning SVD")
RUN_OVERRIDES = {
    "objective": "diffusion",
    "total_steps": RUN_STEPS,
    "log_every_steps": 10,
    "checkpoint_every_steps": RESUME_FROM,
    "sample_every_steps": RUN_STEPS,
    "sample.steps": 4,
    "data.noise_aug": "lognormal",
    "opt.generator_lr": 1e-3,
    "opt.warmup_steps": 10,
    "opt.clip_norm": 1.0,
}


def run_config(seed: int = 0):
    c = tiny.get_config()
    c.seed = seed
    c.update_from_flattened_dict(RUN_OVERRIDES)
    return c


def held_out_losses(config, params_list) -> list[np.ndarray]:
    """The EMA-free denoising losses at ``HELD_OUT_SIGMAS`` on 16 held-out synthetic clips, per params."""
    lay = make_layout(config, sharding.Plan.from_config(config), *build_modules(config))
    vae_params, clip_params = frozen_encoders(config, lay.vae, lay.clip, jax.random.PRNGKey(config.seed))
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    held = trainer.make_batch(config, encoder, HELD_OUT_POSITION, global_micro=16)
    held = {k: v.reshape(-1, *v.shape[2:]) for k, v in held.items()}
    fn = jax.jit(lambda p: objectives.denoising_losses(lay.unet, p, held, HELD_OUT_SIGMAS, jax.random.PRNGKey(99)))
    return [np.asarray(fn(p)) for p in params_list]


def train_cli(workdir) -> subprocess.CompletedProcess:
    """The run through the training CLI (RUN_OVERRIDES on the tiny config), at -O2: RUN_STEPS steps are bound
    by run time (conftest.run_time_bound_env). The fixture and the resume test share its programs."""
    flags = [f"--config.{k}={v}" for k, v in RUN_OVERRIDES.items()]
    cmd = [sys.executable, "-m", "sfv_jax.cli.train", "--config", "tiny", *flags, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_time_bound_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    """(workdir, initial UNet params, final state) of RUN_STEPS diffusion steps of the tiny config."""
    workdir = tmp_path_factory.mktemp("diffusion_run") / "run"
    config = run_config()
    lay = make_layout(config, sharding.Plan.from_config(config), *build_modules(config))
    key = jax.random.PRNGKey(config.seed)
    unet, _, _, heads, _ = init_params(config, lay, key)
    like = init_train_state(lay, unet, heads, jax.random.fold_in(key, 3))  # as trainer.train builds it
    train_cli(workdir)
    mngr = checkpoint_manager(workdir)
    state, meta = restore(mngr, like)
    mngr.close()
    assert meta["step"] == RUN_STEPS
    return workdir, jax.tree.map(np.asarray, unet), state


DIFFUSION_RUN = pytest.mark.xdist_group("diffusion_run")


@DIFFUSION_RUN
def test_a_short_run_learns(diffusion_run):
    """RUN_STEPS steps lower the held-out denoising loss (mean over fixed sigmas, fixed noise, held-out
    clips) to at most LEARN_RATIO of its starting value."""
    _, init, state = diffusion_run
    before, after = held_out_losses(run_config(), [init, state.unet_params()])
    assert after.mean() <= LEARN_RATIO * before.mean(), (before, after)


@DIFFUSION_RUN
def test_cli_resumes_bitwise_and_writes_teacher_samples(diffusion_run, tmp_path):
    """The training CLI, restarted from the run's step-RESUME_FROM checkpoint (the last one removed), ends
    bitwise on the uninterrupted run's state and writes the checkpoint, TensorBoard scalars and a sample
    of the teacher sampler."""
    workdir, _, straight = diffusion_run
    assert (workdir / "samples" / f"step_{RUN_STEPS:07d}.mp4").is_file()
    work = tmp_path / "resumed"
    shutil.copytree(workdir, work)
    shutil.rmtree(work / "checkpoints" / str(RUN_STEPS))
    shutil.rmtree(work / "samples")
    for events in work.glob("events.out.tfevents.*"):  # the uninterrupted run's
        events.unlink()
    proc = train_cli(work)
    assert "resumed from" in proc.stderr and f"at step {RESUME_FROM}" in proc.stderr
    assert "discriminator heads" not in proc.stderr  # no discriminator built
    mngr = checkpoint_manager(work)
    resumed, meta = restore(mngr, straight)
    mngr.close()
    assert meta["step"] == RUN_STEPS
    pairs = zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    frames, fps = video_io.read_video(work / "samples" / f"step_{RUN_STEPS:07d}.mp4")
    assert frames.shape == (4, 16, 16, 3) and fps == 7
    scalars = tensorboard_scalars(work)
    assert set(scalars["g_loss"]) == set(range(RESUME_FROM + 10, RUN_STEPS + 1, 10)) and "d_loss" not in scalars
    assert all(np.isfinite(v) for v in scalars["g_loss"].values())
    summary = json.loads((work / "train_summary.json").read_text())
    assert summary["step"] == RUN_STEPS and summary["steps_this_run"] == RUN_STEPS - RESUME_FROM
