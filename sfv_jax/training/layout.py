"""A run's arrays before they exist: the modules (``build_modules``), their shardings on the plan's mesh
and the abstract train state (``make_layout``, ``jax.eval_shape`` only), then the parameters created in
those shardings (``init_params``, ``init_train_state``) and the optimizers."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sfv_jax import programs
from sfv_jax.checkpoint import components, pretrained
from sfv_jax.models import presets
from sfv_jax.models.build import (
    DTYPES,
    abstract_params,
    image_encoder_from_config,
    init_args,
    unet_from_config,
    vae_from_config,
)
from sfv_jax.models.unet import init_inputs
from sfv_jax.parallel import sharding
from sfv_jax.training import objectives, param_groups
from sfv_jax.training import steps as train_steps
from sfv_jax.training.discriminator import DiscriminatorHeads, backbone_param_subset, backbone_subset, with_conv_in
from sfv_jax.training.run_config import ConfigError


def build_modules(config: ml_collections.ConfigDict, *, svd_defaults: bool = False):
    """(unet, vae, image_encoder) modules, no parameters: the architectures of ``init_from``'s folder, else
    of ``config.model``; ``svd_defaults``: SVD's own when neither is given (the memory planner)."""
    dtype, remat = DTYPES[config.model.dtype], config.model.remat_policy
    if config.init_from:

        def cfg(name):
            return components.read_config(
                components.component_folder(Path(config.init_from), components.COMPONENTS[name])
            )
    elif all(config.model[n] is not None for n in ("unet", "vae", "image_encoder")):

        def cfg(name):
            return config.model[name].to_dict()
    elif svd_defaults:

        def cfg(name):
            return dict(zip(("unet", "vae", "image_encoder"), presets.PIPELINES["svd"], strict=True))[name]
    else:
        missing = [n for n in ("unet", "vae", "image_encoder") if config.model[n] is None]
        raise ConfigError(
            f"--config.init_from is not set and config.model.{missing[0]} is None: give an SVD folder "
            f"(diffusers or converted) or model config dicts for a random init"
        )
    attn = config.model.get("attention_impl")  # the UNet's (the VAE encodes in fp32: JAX's choice there)
    return (
        unet_from_config(cfg("unet"), dtype=dtype, remat_policy=remat, attention_impl=attn),
        vae_from_config(cfg("vae"), dtype=dtype),
        image_encoder_from_config(cfg("image_encoder"), dtype=dtype),
    )


def whole_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the frozen copy a run keeps is a whole UNet (SF-V's distillation term, ``loss.distill_weight`` > 0,
    runs the teacher; the guidance objective its start, ``init_from``) rather than the discriminator's
    backbone, the teacher's encoder (SF-V) or nothing (the diffusion objective)."""
    return objectives.StepConfig.from_config(config).needs_teacher  # the steps' own rule


@dataclasses.dataclass
class Layout:
    """Everything about a run's arrays but the arrays: modules, optimizers and the shardings (on
    ``plan``'s mesh) of the parameters, the frozen backbone, the train state and the batch."""

    plan: sharding.Plan
    unet: nn.Module
    vae: nn.Module
    clip: nn.Module
    heads: DiscriminatorHeads
    gen_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    unet_shardings: Any
    head_shardings: Any
    backbone_shardings: Any
    state_shardings: train_steps.TrainState
    abstract_state: train_steps.TrainState  # ShapeDtypeStructs
    global_micro: int  # samples per accumulation step, over all devices
    trainable: str = "all"  # param_groups.TRAINABLE

    def step_shardings(self) -> train_steps.StepShardings:
        return train_steps.StepShardings(
            self.state_shardings, self.backbone_shardings, self.plan.batch_sharding(1), self.plan.replicated
        )

    def steps(self, config: ml_collections.ConfigDict) -> train_steps.JittedSteps:
        return train_steps.JittedSteps(
            objectives.Models(self.unet, self.heads),
            objectives.StepConfig.from_config(config),
            self.gen_tx,
            self.disc_tx,
            self.step_shardings(),
            self.plan.context,
            (self.plan.mesh, self.plan.rules),
        )

    def abstract_batch(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes, dtypes and sharding of a step's batch (train_steps' ``[k, m, ...]`` layout)."""
        d, f = config.data, self.vae.config.downsample_factor
        k, m, h, w = d.accum_steps, self.global_micro, d.height // f, d.width // f
        c = self.vae.config.latent_channels
        shapes = {
            "latents": (k, m, d.num_frames, h, w, c),
            "image_latents": (k, m, h, w, c),
            "image_embeds": (k, m, self.clip.config.projection_dim),
            "added_time_ids": (k, m, 3),
            "index": (k, m),
        }
        sh = self.plan.batch_sharding(1)
        return {
            n: jax.ShapeDtypeStruct(s, jnp.int32 if n == "index" else jnp.float32, sharding=sh)
            for n, s in shapes.items()
        }


def make_layout(
    config: ml_collections.ConfigDict, plan: sharding.Plan, unet: nn.Module, vae: nn.Module, clip: nn.Module
) -> Layout:
    """Shardings from the modules' logical axis names and ``plan``'s rules (``jax.eval_shape`` only)."""
    d, f = config.data, vae.config.downsample_factor
    down = f * 2 ** (len(unet.config.block_out_channels) - 1)
    if d.height % down or d.width % down:
        raise ConfigError(
            f"--config.data.height/width={d.height}x{d.width}: must be multiples of {down} for this VAE and UNet"
        )
    boxed = abstract_params(unet, boxed=True)
    unet_abs, unet_sh = nn.meta.unbox(boxed), plan.param_shardings(boxed)
    heads = DiscriminatorHeads(
        config.disc.heads,
        config.disc.channels,
        config.disc.proj_dim,
        config.disc.groups,
        config.disc.cond_embedding,
        spectral_norm=config.disc.spectral_norm,
        feature_maps=config.disc.feature_maps,
    )
    if config.objective == "sfv":
        head_boxed = jax.eval_shape(
            functools.partial(
                _init_heads, heads, unet, embed_dim=clip.config.projection_dim, latent_hw=(d.height // f, d.width // f)
            ),
            backbone_subset(unet_abs),
            jax.random.PRNGKey(0),
        )
        head_abs, head_sh = nn.meta.unbox(head_boxed), plan.param_shardings(head_boxed)
        backbone_sh = backbone_subset(unet_sh, whole_teacher(config))
    else:  # no discriminator; the guidance objective's frozen start, the diffusion objective nothing frozen
        head_abs, head_sh = {}, {}
        backbone_sh = backbone_subset(unet_sh, whole=True) if whole_teacher(config) else {}
    (train_abs, frozen_abs), (train_sh, frozen_sh) = (
        param_groups.split(t, config.trainable) for t in (unet_abs, unet_sh)
    )
    gen_tx, disc_tx = make_optimizers(config)
    abstract = jax.eval_shape(
        functools.partial(train_steps.init_state, gen_tx=gen_tx, disc_tx=disc_tx),
        train_abs,
        head_abs,
        rng=jax.random.PRNGKey(0),
        frozen=frozen_abs,
    )
    rep = plan.replicated
    state_sh = train_steps.TrainState(
        step=rep,
        generator=train_sh,
        ema=train_sh,
        heads=head_sh,
        gen_opt=plan.like_params(abstract.gen_opt, train_abs, train_sh),
        disc_opt=plan.like_params(abstract.disc_opt, head_abs, head_sh),
        rng=rep,
        skipped=rep,
        frozen=frozen_sh,
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Layout(
        plan,
        unet,
        vae,
        clip,
        heads,
        gen_tx,
        disc_tx,
        unet_sh,
        head_sh,
        backbone_sh,
        state_sh,
        abstract,
        d.micro_batch * plan.batch_shards,
        config.trainable,
    )


def _init_heads(
    heads: DiscriminatorHeads,
    unet: nn.Module,
    backbone: Any,
    key: jax.Array,
    *,
    embed_dim: int,
    latent_hw: tuple[int, int],
    batch: int = 1,
) -> Any:
    """The heads' boxed random init, sized from the backbone's feature shapes."""
    feats = jax.eval_shape(
        lambda p, *a: unet.apply({"params": p}, *a, with_conv_in(heads.feature_maps), method=unet.encode),
        backbone,
        *init_inputs(unet.config, batch, unet.config.num_frames, *latent_hw),
    )
    return heads.init(
        key, [jnp.zeros(f.shape, jnp.float32) for f in feats], jnp.zeros((batch, embed_dim)), jnp.ones((batch,))
    )["params"]


def _random_init(model: nn.Module, key: jax.Array, out: Any) -> Any:
    init = programs.jitted(
        ("init", model, programs.shardings_key(out)),
        lambda: jax.jit(lambda k: nn.meta.unbox(model.init(k, *init_args(model))["params"]), out_shardings=out),
    )
    return init(key)


def frozen_encoders(config: ml_collections.ConfigDict, vae: nn.Module, clip: nn.Module, key: jax.Array):
    """(vae_params, image_encoder_params) on this process's first device: ``init_from``'s weights, else
    the random init of :func:`init_params` (the same keys, so the trainer and the latent encoder agree)."""
    local = jax.local_devices()[0]
    if config.init_from:
        dtype = DTYPES[config.model.dtype]
        vae_params = pretrained.load_vae(config.init_from, dtype)[1]
        clip_params = pretrained.load_image_encoder(config.init_from, dtype)[1]
        return jax.device_put((vae_params, clip_params), local)
    _, k_vae, k_clip = jax.random.split(jax.random.fold_in(key, 1), 3)
    one = jax.sharding.SingleDeviceSharding(local)
    return _random_init(vae, k_vae, one), _random_init(clip, k_clip, one)


def init_params(config: ml_collections.ConfigDict, lay: Layout, key: jax.Array):
    """(unet_params, vae_params, clip_params, head_params, backbone): the UNet, heads and backbone
    created directly in their shardings (jitted init with ``out_shardings``; no full host copy for a
    random init), the frozen VAE and image encoder on this process's first device (they encode the
    process's own samples). ``init_from``: weights from the SVD folder, placed leaf by leaf."""
    k_unet = jax.random.split(jax.random.fold_in(key, 1), 3)[0]
    if config.init_from:
        components.check_pipeline_folder(Path(config.init_from))
        _, params = pretrained.load_unet(config.init_from, DTYPES[config.model.dtype])
        unet_params = jax.device_put(jax.tree.map(np.asarray, params), lay.unet_shardings)
        del params
    else:
        unet_params = _random_init(lay.unet, k_unet, lay.unet_shardings)
    vae_params, clip_params = frozen_encoders(config, lay.vae, lay.clip, key)
    if not lay.backbone_shardings:  # the diffusion objective: no discriminator, nothing frozen to copy
        return unet_params, vae_params, clip_params, {}, {}
    head_params = {}
    if config.objective == "sfv":
        d, f = config.data, lay.vae.config.downsample_factor
        kw = dict(embed_dim=lay.clip.config.projection_dim, latent_hw=(d.height // f, d.width // f))
        backbone_shapes = jax.eval_shape(backbone_subset, unet_params)  # the heads' init needs only its shapes
        init_heads = programs.jitted(
            ("init_heads", lay.heads, lay.unet, tuple(kw.items()), programs.shardings_key(lay.head_shardings)),
            lambda: jax.jit(
                lambda k: nn.meta.unbox(_init_heads(lay.heads, lay.unet, backbone_shapes, k, **kw)),
                out_shardings=lay.head_shardings,
            ),
        )
        head_params = init_heads(jax.random.fold_in(key, 2))
    subset = programs.jitted(
        ("backbone", whole_teacher(config), programs.shardings_key(lay.backbone_shardings)),
        lambda: jax.jit(
            functools.partial(backbone_param_subset, whole=whole_teacher(config)), out_shardings=lay.backbone_shardings
        ),
    )
    backbone = subset(unet_params)
    return unet_params, vae_params, clip_params, head_params, backbone


def init_train_state(lay: Layout, unet_params: Any, head_params: Any, rng: jax.Array) -> train_steps.TrainState:
    """The fresh train state (EMA = copy of the trained parameters, zero optimizer states, the rest of the
    UNet in ``frozen``) in ``lay.state_shardings``; ``unet_params`` the full UNet tree."""

    def fn(unet_params, head_params, rng):
        train, frozen = param_groups.split(unet_params, lay.trainable)
        return train_steps.init_state(train, head_params, lay.gen_tx, lay.disc_tx, rng, frozen=frozen)

    key = ("train_state", lay.trainable, lay.gen_tx, lay.disc_tx, programs.shardings_key(lay.state_shardings))
    init = programs.jitted(key, lambda: jax.jit(fn, out_shardings=lay.state_shardings))
    return init(unet_params, head_params, rng)


def optimizer_name(config: ml_collections.ConfigDict) -> str:
    return config.opt.optimizer or train_steps.DEFAULT_OPTIMIZER[config.objective]


def make_optimizer(config: ml_collections.ConfigDict, learning_rate: float) -> optax.GradientTransformation:
    """One optimizer of ``config.opt``: SM3 (paper Sec. 4; momentum ``b1``, second-moment decay ``b2``) or
    AdamW (``adamw_b1``, ``adamw_b2``, ``weight_decay``), both after global-norm gradient clipping at
    ``clip_norm`` (None: none) and with a linear warm-up of the learning rate over ``warmup_steps``
    (0: none; the paper's SM3 has neither). Equal settings return the same object within a process, so
    that the update steps jitted with it are built once (:mod:`sfv_jax.programs`)."""
    o = config.opt
    name = optimizer_name(config)
    if name not in train_steps.OPTIMIZERS:
        raise ConfigError(f"--config.opt.optimizer={o.optimizer!r}: must be one of {train_steps.OPTIMIZERS} or None")
    settings = (o.b1, o.b2, o.adamw_b1, o.adamw_b2, o.adamw_eps, o.weight_decay, o.warmup_steps, o.clip_norm)
    return _optimizer(name, float(learning_rate), *settings)


@functools.lru_cache(maxsize=32)
def _optimizer(name, learning_rate, b1, b2, adamw_b1, adamw_b2, adamw_eps, weight_decay, warmup_steps, clip_norm):
    # warm-up: update n (from 1) uses lr * min(1, n / warmup_steps), so the first update already moves
    lr = (lambda count: learning_rate * jnp.minimum(1.0, (count + 1) / warmup_steps)) if warmup_steps else learning_rate
    if name == "sm3":
        tx = train_steps.make_optimizer(lr, b1, b2)
    else:
        tx = optax.adamw(lr, b1=adamw_b1, b2=adamw_b2, eps=adamw_eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def make_optimizers(config: ml_collections.ConfigDict):
    """(generator, discriminator) optimizers (the discriminator's is unused without one)."""
    return make_optimizer(config, config.opt.generator_lr), make_optimizer(config, config.opt.discriminator_lr)
