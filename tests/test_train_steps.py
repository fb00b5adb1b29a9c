"""SF-V's training steps in-process on the tiny config (configs/tiny.py): gradient routing, the approximate
R1, the gradient-balance metrics, the discriminator against a frozen generator, accumulation, a non-finite
batch, several discriminator updates per iteration; the step settings and the packaged configs' checks.

The steps are built from the same pieces as ``trainer.train`` (tests/test_training.py runs it), so both
files and the CLI subprocesses compile identical programs; conftest's session-wide persistent XLA cache
then compiles each of them once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import all_finite, to_host, trees_equal

from sfv_jax.configs import tiny
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.parallel import sharding
from sfv_jax.training import heldout, losses, objectives, trainer
from sfv_jax.training.discriminator import backbone_param_subset
from sfv_jax.training.layout import build_modules, init_params, init_train_state, make_layout
from sfv_jax.training.run_config import ConfigError, check_config


def _dev(setup, state):
    """Host copy of a state -> device arrays in the shardings train() uses (the same executables)."""
    return jax.device_put(state, setup["state_shardings"])


def _changed_fraction(a, b) -> float:
    la, lb = jax.tree.leaves(to_host(a)), jax.tree.leaves(to_host(b))
    return sum(not np.array_equal(x, y) for x, y in zip(la, lb, strict=True)) / len(la)


@pytest.fixture(scope="module")
def setup():
    """The tiny config's models, steps, initial state (host copy) and first batch, as ``train`` builds them."""
    config = tiny.get_config()
    key = jax.random.PRNGKey(config.seed)
    lay = make_layout(config, sharding.Plan.from_config(config), *build_modules(config))
    unet_params, vae_params, clip_params, head_params, backbone = init_params(config, lay, key)
    steps = lay.steps(config)
    state = init_train_state(lay, unet_params, head_params, jax.random.fold_in(key, 3))
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    batch = trainer.make_batch(config, encoder, 0)
    return {
        "state_shardings": lay.state_shardings,
        "config": config,
        "steps": steps,
        "state": to_host(state),
        "backbone": backbone,
        "batch": batch,
        "encoder": encoder,
    }


def test_gradient_routing(setup):
    """G step: only the UNet (and its EMA, optimizer) moves; D step: only the heads; backbone frozen."""
    steps, state0, batch = setup["steps"], setup["state"], setup["batch"]
    backbone0 = to_host(setup["backbone"])
    s1, gm = steps.generator_step(_dev(setup, state0), batch, setup["backbone"])
    s1 = to_host(s1)
    assert float(gm["g_finite"]) == 1 and np.isfinite(float(gm["g_loss"])) and float(gm["g_grad_norm"]) > 0
    assert _changed_fraction(s1.generator, state0.generator) > 0.9
    assert _changed_fraction(s1.ema, state0.ema) > 0.9
    assert trees_equal(s1.heads, state0.heads) and trees_equal(s1.disc_opt, state0.disc_opt)
    assert int(s1.step) == 0 and int(s1.skipped) == 0

    s2, dm = steps.discriminator_step(_dev(setup, s1), batch, setup["backbone"])
    s2 = to_host(s2)
    assert float(dm["d_finite"]) == 1 and np.isfinite(float(dm["d_loss"])) and float(dm["d_grad_norm"]) > 0
    assert _changed_fraction(s2.heads, s1.heads) > 0.9
    for field in ("generator", "ema", "gen_opt", "rng"):
        assert trees_equal(getattr(s2, field), getattr(s1, field)), field
    assert int(s2.step) == 1
    assert trees_equal(setup["backbone"], backbone0)
    # the backbone is a copy of the initial UNet encoder: it no longer equals the updated generator
    assert not trees_equal(backbone_param_subset(s2.generator), backbone0)
    assert trees_equal(backbone_param_subset(state0.generator), backbone0)


def test_approximate_r1_in_the_discriminator_step(setup):
    """``loss.r1_type="approx"`` through the discriminator's loss (it once failed on a negative fold_in):
    finite and positive, and its perturbation is drawn per sample like every other draw, so the loss of a
    batch of two is the mean of the two samples' losses."""
    steps, state = setup["steps"], setup["state"]
    cfg = dataclasses.replace(steps.cfg, r1_type="approx", r1_gamma=1.0)
    fn = jax.jit(functools.partial(objectives.discriminator_loss_fn, models=steps.models, cfg=cfg))
    both = {k: v.reshape(-1, *v.shape[2:]) for k, v in setup["batch"].items()}  # [k=2, m=1] -> [2]
    args = (state.unet_params(), setup["backbone"], jax.random.PRNGKey(7))
    loss, metrics = fn(state.heads, both, *args)
    singles = [fn(state.heads, {k: v[i : i + 1] for k, v in both.items()}, *args)[0] for i in range(2)]
    assert np.isfinite(float(loss)) and float(metrics["d_r1"]) > 0, metrics
    assert float(loss) == pytest.approx(np.mean([float(x) for x in singles]), rel=1e-5)


def test_distillation_term_adds_the_guided_teacher_pull(setup):
    """``loss.distill_weight``: the run keeps the whole teacher frozen (the layout's backbone has its decoder too);
    the generator's loss gains weight x the term and nothing else (``loss.grad_balance`` on beside it adds
    metrics only) (its noise has its own stream, so the
    adversarial term is the same to the bit); the term's target is the teacher's guidance as the sampler
    computes it (pipeline.velocity_fn, SVD's per-frame scales)."""
    from sfv_jax.diffusion import edm, pipeline, samplers
    from sfv_jax.training.discriminator import backbone_subset

    steps, state, batch, config = setup["steps"], setup["state"], setup["batch"], setup["config"]
    on = copy.deepcopy(config)
    on.loss.distill_weight = 2.0
    lay = make_layout(on, sharding.Plan.from_config(on), *build_modules(on))
    assert set(lay.backbone_shardings) == set(backbone_subset(state.unet_params(), whole=True))
    assert any(k.startswith("up_blocks") for k in lay.backbone_shardings)
    assert not any(k.startswith("up_blocks") for k in setup["backbone"])

    teacher = backbone_param_subset(state.unet_params(), whole=True)
    micro = jax.tree.map(lambda v: v[0], batch)
    key = jax.random.PRNGKey(5)
    out = {}
    for weight, balance in ((0.0, False), (2.0, True)):
        cfg = dataclasses.replace(steps.cfg, distill_weight=weight, grad_balance=balance)
        fn = jax.jit(functools.partial(objectives.generator_loss_fn, models=steps.models, cfg=cfg))
        out[weight] = fn(state.generator, micro, state.frozen, teacher, state.heads, key)
    (loss0, m0), (loss2, m2) = out[0.0], out[2.0]
    assert "g_distill" not in m0 and float(m2["g_distill"]) > 0
    assert float(m2["g_adv"]) == float(m0["g_adv"])
    # loss.grad_balance only adds metrics: each term's gradient norm at x0_hat, finite and positive
    assert float(loss2) == pytest.approx(float(loss0) + 2.0 * float(m2["g_distill"]), rel=1e-6)
    assert "g_adv_out_grad" not in m0
    for name in ("g_adv_out_grad", "g_recon_out_grad", "g_distill_out_grad"):
        assert np.isfinite(float(m2[name])) and float(m2[name]) > 0, name

    cond = objectives.conditioning(micro)
    x = jax.random.normal(jax.random.PRNGKey(1), micro["latents"].shape)
    scales = samplers.guidance_scales(1.0, 3.0, x.shape[1])
    sigma = 1.7
    got = objectives.guided_denoise(steps.models.unet, teacher, x, jnp.full((x.shape[0],), sigma), cond, scales)
    velocity = pipeline.velocity_fn(
        steps.models.unet,
        teacher,
        cond["image_latents"][:, None].repeat(x.shape[1], 1),
        cond["image_embeds"][:, None],
        cond["added_time_ids"],
        scales,
    )
    want = edm.denoise(velocity, x, jnp.float32(sigma))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_guidance_objective_regresses_onto_the_guided_start(setup):
    """objective="guidance": no heads, the whole start kept frozen; its loss is the student's squared distance to
    the start's guided output, so a student equal to its start has loss 0 exactly at guidance 1 (the guided output
    is then the conditional one) and a positive loss at the teacher's 1 -> 3."""
    steps, state, batch, config = setup["steps"], setup["state"], setup["batch"], setup["config"]
    cfg_config = copy.deepcopy(config)
    cfg_config.objective = "guidance"
    lay = make_layout(cfg_config, sharding.Plan.from_config(cfg_config), *build_modules(cfg_config))
    assert lay.head_shardings == {} and any(k.startswith("up_blocks") for k in lay.backbone_shardings)
    assert lay.steps(cfg_config).d_grads is None
    with pytest.raises(ConfigError, match="init_from=None: the guidance objective distils a trained generator"):
        check_config(cfg_config)
    cfg_config.init_from = "runs/sfv_export"
    check_config(cfg_config)

    start = backbone_param_subset(state.unet_params(), whole=True)
    micro = jax.tree.map(lambda v: v[0], batch)
    losses_at = {}
    for top in (1.0, 3.0):
        cfg = dataclasses.replace(steps.cfg, objective="guidance", distill_min_guidance=1.0, distill_max_guidance=top)
        fn = jax.jit(functools.partial(objectives.guidance_loss_fn, models=steps.models, cfg=cfg))
        losses_at[top] = float(fn(state.generator, micro, state.frozen, start, {}, jax.random.PRNGKey(3))[0])
    assert losses_at[1.0] == pytest.approx(0.0, abs=1e-10) and losses_at[3.0] > 1e-6


def test_a_frozen_generator_gives_a_growing_margin(setup):
    """Discriminator updates only (the generator frozen): the held-out grip (``training.heldout.grip``: 8
    fixed clips, each at every generator level, fixed sigma' and noise) has per-level margins (score(fake) -
    score(real)) and a pair rank that grow at the one-step level sigma_max as the heads learn to tell this
    generator's videos from real ones; every level is measured on every clip."""
    steps, config = setup["steps"], setup["config"]
    held = [trainer.make_batch(config, setup["encoder"], 1000 + 2 * i) for i in range(4)]
    held = {k: np.concatenate([b[k] for b in held], axis=0).reshape(1, 8, *held[0][k].shape[2:]) for k in held[0]}
    fn = jax.jit(functools.partial(heldout.batch_grip, models=steps.models, cfg=steps.cfg))

    def grip(state):
        sums = fn(state.heads, held, state.unet_params(), setup["backbone"], jax.random.PRNGKey(11))
        assert {float(v) for k, v in sums.items() if k.startswith(losses.COUNT_PREFIX)} == {8.0}, sums
        m = losses.reduce_interval([jax.device_get(sums)])
        assert len([k for k in m if k.startswith("d_rank_")]) == 3 * 2, m  # 3 levels x 2 head kinds
        return m["d_margin_spatial@700"], m["d_margin_temporal@700"], m["d_rank_spatial@700"]

    state = _dev(setup, setup["state"])
    seen = [grip(state)]
    for _round in range(2):
        for _ in range(5):
            state, _ = steps.discriminator_step(state, setup["batch"], setup["backbone"])
        seen.append(grip(state))
    (s0, t0, r0), (s1, t1, _), (s2, t2, r2) = seen
    # measured: spatial margin -0.001 -> 0.056 -> 0.128, temporal -0.013 -> 0.102 -> 0.131, rank 0.5 -> 0.875
    assert s0 < s1 < s2 and t0 < t1 < t2 and s2 > 0.08 and t2 > 0.08, seen
    assert r2 > r0 and r2 >= 0.75, seen


def _tree_rel(a, b) -> tuple[float, float]:
    """(max |a - b| / max |b|, ||a - b|| / ||b||) over the whole gradient tree. (Per leaf the relative error
    is meaningless for leaves whose exact gradient is 0, e.g. conv biases followed by a GroupNorm: their
    float32 gradients are round-off, ~1e-10.)"""
    la, lb = jax.tree.leaves(to_host(a)), jax.tree.leaves(to_host(b))
    diff = [np.asarray(x, np.float64) - y for x, y in zip(la, lb, strict=True)]
    max_rel = max(np.abs(d).max() for d in diff) / max(np.abs(y).max() for y in lb)
    l2_rel = np.sqrt(sum((d**2).sum() for d in diff) / sum((np.asarray(y, np.float64) ** 2).sum() for y in lb))
    return float(max_rel), float(l2_rel)


def test_accumulation_equals_concatenated_batch(setup):
    """k = 2 micro-batches of 1 give the gradients and metrics of one micro-batch of 2 (<= 1e-5)."""
    steps, batch, backbone = setup["steps"], setup["batch"], setup["backbone"]
    state = _dev(setup, setup["state"])
    k, m = batch["index"].shape
    assert (k, m) == (2, 1)
    concat = {name: v.reshape(1, k * m, *v.shape[2:]) for name, v in batch.items()}
    for grads_fn, extra in ((steps.g_grads, ()), (steps.d_grads, steps.substep_args())):
        g_acc, m_acc = grads_fn(state, batch, backbone, *extra)
        g_cat, m_cat = grads_fn(state, concat, backbone, *extra)
        max_rel, l2_rel = _tree_rel(g_acc, g_cat)
        assert max_rel <= 1e-5 and l2_rel <= 1e-5, (grads_fn, max_rel, l2_rel)
        for name in m_acc:
            np.testing.assert_allclose(float(m_acc[name]), float(m_cat[name]), rtol=1e-5, atol=1e-7, err_msg=name)


def test_nonfinite_batch_is_skipped(setup):
    """A NaN in the batch: both updates are skipped, the state stays bitwise unchanged and finite."""
    steps, state0 = setup["steps"], setup["state"]
    bad = dict(setup["batch"])
    bad["latents"] = bad["latents"].copy()
    bad["latents"][1, 0, 0, 0, 0, 0] = np.nan
    s1, gm = steps.generator_step(_dev(setup, state0), bad, setup["backbone"])
    s2, dm = steps.discriminator_step(s1, bad, setup["backbone"])
    s2 = to_host(s2)
    assert float(gm["g_finite"]) == 0 and float(dm["d_finite"]) == 0
    assert not np.isfinite(float(gm["g_loss"]))
    for field in ("generator", "ema", "heads", "gen_opt", "disc_opt", "rng"):
        assert trees_equal(getattr(s2, field), getattr(state0, field)), field
    assert int(s2.step) == 1 and int(s2.skipped) == 2
    assert all_finite(s2)


def test_several_discriminator_updates_per_iteration(setup):
    """opt.disc_updates = 2: the generator step, then two discriminator updates on the same batch; the second
    draws fresh noise, the heads move twice and the iteration counter advances once. Update 0 is the
    single update of the paper's setting, bit for bit."""
    steps, state0, batch, backbone = setup["steps"], setup["state"], setup["batch"], setup["backbone"]
    s1 = to_host(steps.generator_step(_dev(setup, state0), batch, backbone)[0])
    one, _ = steps.discriminator_step(_dev(setup, s1), batch, backbone)
    first, m0 = steps.discriminator_step(_dev(setup, s1), batch, backbone, 0, False)
    first = to_host(first)
    assert trees_equal(first.heads, to_host(one).heads) and int(first.step) == int(s1.step) == 0
    second, m1 = steps.discriminator_step(_dev(setup, first), batch, backbone, 1, True)
    second = to_host(second)
    assert int(second.step) == 1 and not trees_equal(second.heads, first.heads)
    assert float(m1["d_loss"]) != float(m0["d_loss"])  # other generator levels, sigma' and noise
    # JittedSteps.step runs them in that order (the same compiled programs: disc_updates is read in Python)
    twice = copy.copy(steps)
    twice.cfg = dataclasses.replace(steps.cfg, disc_updates=2)
    state, metrics = twice.step(_dev(setup, state0), batch, backbone)
    state = to_host(state)
    for field in ("generator", "ema", "heads", "gen_opt", "disc_opt", "step"):
        assert trees_equal(getattr(state, field), getattr(second, field)), field
    assert float(metrics["d_loss"]) == float(m1["d_loss"]) and "g_loss" in metrics


def test_step_settings_and_log_line_come_from_the_config():
    """StepConfig has no defaults of its own: every field is the config's; the console's log line."""
    config = tiny.get_config()
    config.loss.r1_gamma, config.opt.ema_rate = 0.5, 0.9
    cfg = objectives.StepConfig.from_config(config)
    assert cfg.r1_gamma == 0.5 and cfg.ema_rate == 0.9 and cfg.recon_weight == config.loss.recon_weight
    assert cfg.nonfinite == config.opt.nonfinite and cfg.generator_grid == config.loss.generator_grid
    line = trainer.format_metrics(10, 400, {"d_loss": 1.98, "g_loss": 0.123456, "g_finite": 1.0, "zeta": 2.0}, 3.14159)
    assert line == "step 10/400  g_loss 0.1235  d_loss 1.98  zeta 2  3.14 steps/s"
    assert trainer.describe_params("heads", {"a": np.zeros((2, 3), np.float32)}) == (
        "heads: 6 parameters, 2.4e-08 GB (float32), 1 tensors"
    )
    config.opt.halt_check = "sometimes"
    with pytest.raises(ConfigError, match="opt.halt_check"):
        check_config(config)


def test_equal_settings_reuse_the_jitted_programs():
    """Two layouts built from equal configs give the same jitted steps and optimizers (a second
    ``trainer.train`` in one process finds its programs traced and loaded); a different step setting,
    optimizer setting, mesh or logical-axis rule gives new ones."""
    from sfv_jax.training import layout as layout_lib

    def steps_of(config, rules=None):
        plan = sharding.Plan.from_config(config)
        if rules is not None:
            plan = sharding.Plan(plan.mesh, rules, plan.min_shard_size, plan.fsdp_fallback)
        return make_layout(config, plan, *build_modules(config)).steps(config)

    a, b = steps_of(tiny.get_config()), steps_of(tiny.get_config())
    assert all(getattr(a, n) is getattr(b, n) for n in ("g_grads", "g_update", "d_grads", "d_update"))
    r1 = tiny.get_config()
    r1.loss.r1_gamma = 0.5
    assert steps_of(r1).g_grads is not a.g_grads
    lr = tiny.get_config()
    lr.opt.generator_lr = 2e-5
    other = steps_of(lr)
    assert other.g_update is not a.g_update and other.gen_tx is not a.gen_tx and other.disc_tx is a.disc_tx
    assert steps_of(tiny.get_config(), rules=(("batch", None),)).g_grads is not a.g_grads
    c = tiny.get_config()
    assert layout_lib.make_optimizer(c, 1e-3) is layout_lib.make_optimizer(tiny.get_config(), 1e-3)
    c.opt.warmup_steps = 5
    assert layout_lib.make_optimizer(c, 1e-3) is not layout_lib.make_optimizer(tiny.get_config(), 1e-3)


def test_nonfinite_steps_reads_each_steps_finite_flags():
    """The loop's check: a step is non-finite when any of its ``*_finite`` flags is 0 (device arrays or
    host numbers); other metrics, and steps without flags, never count."""
    import jax.numpy as jnp

    pending = [
        (3, {"g_finite": jnp.float32(1), "d_finite": jnp.float32(1), "g_loss": jnp.float32(np.nan)}),
        (4, {"g_finite": jnp.float32(1), "d_finite": jnp.float32(0)}),
        (5, {"g_loss": 1.0}),
        (6, {"g_finite": 0.0}),
    ]
    assert trainer.nonfinite_steps(pending) == [4, 6]
    assert trainer.nonfinite_steps([]) == []


@pytest.mark.parametrize("name", ["sfv_svd", "tiny", "svd_finetune", "toy_teacher", "toy_sfv"])
def test_packaged_training_configs_pass_their_checks(name):
    """Every packaged training config is runnable as written (check_config; toy_sfv and sfv_svd need
    --config.init_from, which check_config leaves to the loader)."""
    import importlib

    from sfv_jax.training.run_config import check_config

    config = importlib.import_module(f"sfv_jax.configs.{name}").get_config()
    check_config(config)
    assert config.objective in objectives.OBJECTIVES
