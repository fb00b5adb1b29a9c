"""Runs the tiny SF-V steps on several meshes of virtual CPU devices (tests/test_sharding.py starts it in a
subprocess: the device count is fixed when JAX starts).

    python tests/sharded_worker.py OUT MESH [MESH ...]       e.g. OUT data=2,fsdp=4

For a single device and then each MESH it runs one generator step and one discriminator step from the
same initial state on the same global batch (2 accumulation steps of 8 samples) and writes
OUT/<mesh>.npz: the generator and discriminator gradients, the metrics and the final state, as host
arrays keyed by tree path; and OUT/<mesh>_replay.npz: the state of the single-device updates applied
to that mesh's gradients. OUT/report.json holds, per mesh, the per-device bytes of every state leaf
above the sharding threshold and, for the checkpoint check, whether a checkpoint saved on one device
restores onto each mesh with the same values and the target shardings.

Then the same for the diffusion objective with ``trainable=temporal`` (AdamW, clipping, warm-up,
per-sample noise augmentation) on one device and the last MESH: OUT/diffusion_<name>.npz (one step;
there is no discriminator) and OUT/diffusion_<mesh>_replay.npz.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sfv_jax.configs import tiny  # noqa: E402
from sfv_jax.data.latents import ClipEncoder  # noqa: E402
from sfv_jax.parallel import sharding  # noqa: E402
from sfv_jax.training import trainer  # noqa: E402
from sfv_jax.training.checkpoints import restore  # noqa: E402
from sfv_jax.training.layout import build_modules, init_params, init_train_state, make_layout  # noqa: E402

GLOBAL = 8  # samples per accumulation step (the tiny config accumulates 2: 16 per step)
MIN_SHARD = 1024  # elements: lower than the default so that most tiny leaves are sharded (as the 2-process test)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def config_for(plan: sharding.Plan, objective: str = "sfv"):
    """The tiny config (2 accumulation steps) with ``GLOBAL`` samples per accumulation step: on 8 devices
    the step of ``test_two_processes_train_like_one``'s 2-process training CLI run, which ends on this
    state. ``objective="diffusion"``: SVD's loss, temporal
    layers only, AdamW with clipping and warm-up, lognormal noise augmentation."""
    c = tiny.get_config()
    c.data.micro_batch = GLOBAL // plan.batch_shards
    c.sharding.min_shard_size = MIN_SHARD
    if objective == "diffusion":
        c.objective, c.trainable, c.data.noise_aug = "diffusion", "temporal", "lognormal"
        c.opt.warmup_steps, c.opt.clip_norm = 2, 1.0
    return c


def plan_for(spec: str | None) -> sharding.Plan:
    if spec is None:
        return sharding.Plan(sharding.make_mesh({}, jax.devices()[:1]), min_shard_size=MIN_SHARD)
    return sharding.Plan(sharding.make_mesh(sharding.parse_mesh(spec)), min_shard_size=MIN_SHARD)


def replay(single_steps, host_state, arrays: dict, like, metrics: tuple[dict, dict]) -> dict:
    """The single-device updates applied to a mesh run's own gradients (isolates the sharded update from
    the gradients' round-off, which SM3's normalisation amplifies). ``metrics``: the mesh run's generator
    and discriminator metrics as each update received them (the same pytrees: the single-device run's
    compiled updates are reused)."""

    def tree(prefix, example):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(example)[0]]
        return jax.tree.unflatten(jax.tree.structure(example), [arrays[prefix + p] for p in paths])

    state = jax.device_put(host_state, like)
    g_metrics, d_metrics = (jax.device_put(m, like.step) for m in metrics)
    state, _ = single_steps.g_update(state, tree("g_grads", host_state.generator), g_metrics)
    if single_steps.d_update is not None:
        state, _ = single_steps.d_update(state, tree("d_grads", host_state.heads), d_metrics, *single_steps.last_args())
    return {"state" + k: v for k, v in flat(state).items()}


def run(plan: sharding.Plan, host_state, host_backbone, encoder, objective="sfv") -> tuple[dict, object, object, tuple]:
    config = config_for(plan, objective)
    lay = make_layout(config, plan, *build_modules(config))
    steps = lay.steps(config)
    state = jax.device_put(host_state, lay.state_shardings)
    backbone = jax.device_put(host_backbone, lay.backbone_shardings)
    batch = plan.global_batch(trainer.make_batch(config, encoder, 0, GLOBAL, plan.local_rows(GLOBAL)), GLOBAL)
    d_grads, d_metrics = {}, {}
    with plan.context():
        g_grads, g_metrics = steps.g_grads(state, batch, backbone)
        state, _ = steps.g_update(state, g_grads, g_metrics)
        if steps.d_grads is not None:
            d_grads, d_metrics = steps.d_grads(state, batch, backbone, *steps.substep_args())
            state, _ = steps.d_update(state, d_grads, d_metrics, *steps.last_args())
    out = {
        **{"g_grads" + k: v for k, v in flat(g_grads).items()},
        **{"d_grads" + k: v for k, v in flat(d_grads).items()},
        **{"metrics" + k: v for k, v in flat({**g_metrics, **d_metrics}).items()},
        **{"state" + k: v for k, v in flat(state).items()},
    }
    return out, state, lay, jax.device_get((g_metrics, d_metrics))


def run_diffusion(out: Path, spec: str) -> None:
    """The diffusion objective (temporal layers only) on one device and on ``spec``, with the replay."""
    single = plan_for(None)
    config = config_for(single, "diffusion")
    key = jax.random.PRNGKey(config.seed)
    lay = make_layout(config, single, *build_modules(config))
    unet_params, vae_params, clip_params, head_params, backbone = init_params(config, lay, key)
    state0 = jax.tree.map(np.asarray, init_train_state(lay, unet_params, head_params, jax.random.fold_in(key, 3)))
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)
    single_steps = lay.steps(config)
    for name in (None, spec):
        plan = single if name is None else plan_for(name)
        arrays, _, _, metrics = run(plan, state0, {}, encoder, "diffusion")
        np.savez(out / f"diffusion_{name or 'single'}.npz", **arrays)
        if name is not None:
            with single.context():
                replayed = replay(single_steps, state0, arrays, lay.state_shardings, metrics)
            np.savez(out / f"diffusion_{name}_replay.npz", **replayed)
        print(f"diffusion {name or 'single'}: done", flush=True)


def main(out: Path, specs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    single = plan_for(None)
    config = config_for(single)
    key = jax.random.PRNGKey(config.seed)
    lay = make_layout(config, single, *build_modules(config))
    unet_params, vae_params, clip_params, head_params, backbone = init_params(config, lay, key)
    state0 = jax.tree.map(np.asarray, init_train_state(lay, unet_params, head_params, jax.random.fold_in(key, 3)))
    backbone0 = jax.tree.map(np.asarray, backbone)
    encoder = ClipEncoder(lay.vae, vae_params, lay.clip, clip_params, seed=config.seed)

    single_steps = lay.steps(config)
    report: dict = {"meshes": {}}
    results, layouts = {}, {}
    for spec in [None, *specs]:
        plan = single if spec is None else plan_for(spec)
        arrays, state, lay_m, metrics = run(plan, state0, backbone0, encoder)
        name = spec or "single"
        np.savez(out / f"{name}.npz", **arrays)
        if spec is not None:
            with single.context():
                replayed = replay(single_steps, state0, arrays, lay.state_shardings, metrics)
                np.savez(out / f"{name}_replay.npz", **replayed)
        leaves = []
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
            if x.size >= MIN_SHARD:
                per_device = max(s.data.size for s in x.addressable_shards) * x.dtype.itemsize
                leaves.append([jax.tree_util.keystr(path), int(x.size * x.dtype.itemsize), int(per_device)])
        report["meshes"][name] = {"shape": plan.shape, "large_leaves": leaves}
        results[name], layouts[name] = state, lay_m
        print(f"{name}: done", flush=True)

    # a checkpoint saved on one device, restored onto every mesh
    import orbax.checkpoint as ocp

    first = "single"
    mngr = ocp.CheckpointManager(out / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(results[first]), meta=ocp.args.JsonSave({})))
    mngr.wait_until_finished()
    saved = flat(results[first])
    report["restore"] = {}
    for spec in specs:
        target = layouts[spec]
        restored, _ = restore(mngr, target.abstract_state, 1)
        same_values = all(np.array_equal(saved[k], v) for k, v in flat(restored).items())
        same_sharding = all(
            a.sharding == s
            for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target.state_shardings), strict=True)
        )
        report["restore"][f"{first}->{spec}"] = {
            "values_equal": bool(same_values),
            "shardings_match": bool(same_sharding),
        }
    mngr.close()
    run_diffusion(out, specs[-1])
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
