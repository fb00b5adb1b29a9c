"""Flax port of diffusers' ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion).

``UNetSpatioTemporal.apply({"params": p}, sample, timestep, encoder_hidden_states, added_time_ids)``:
  sample                 [B, F, H, W, in_channels]  (SVD: 8 = noisy latent (4) ++ image latent (4))
  timestep               scalar or [B]              c_noise = 0.25 * ln(sigma)
  encoder_hidden_states  [B, S, cross_attention_dim] (SVD: the CLIP image embedding, S = 1)
  added_time_ids         [B, 3]                     [fps - 1, motion_bucket_id, noise_aug_strength]
  -> [B, F, H, W, out_channels]

``method=UNetSpatioTemporal.encode`` runs only the embeddings, ``conv_in`` and the down blocks and
returns every down block's output: the SF-V discriminator backbone (paper Sec. 3.3) is exactly
this code with the pretrained weights. The numerics a port must match: docs/svd_port.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.attention import TransformerSpatioTemporal
from sfv_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from sfv_jax.models.primitives import GroupNorm, conv
from sfv_jax.models.resnet import Downsample2D, SpatioTemporalResBlock, Upsample2D

Dtype = Any

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"
CLASS_NAME = "UNetSpatioTemporalConditionModel"

# Activation logical axes (mapped to mesh axes by the sharding rules; no-ops without a mesh).
VIDEO_AXES = ("activation_batch", "activation_frames", "activation_height", "activation_width", "activation_embed")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _per_block(value: Any, n: int, field: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: `{field}` has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``unet/config.json`` that define the network (defaults = SVD)."""

    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    cross_attention_dim: tuple[int, ...] = (1024, 1024, 1024, 1024)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 14
    sample_size: int | None = 96

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """Build from a diffusers config dict; ``_``-prefixed and unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        cls_name = cfg.get("_class_name", CLASS_NAME)
        if cls_name != CLASS_NAME:
            raise ValueError(f"UNet config: _class_name is {cls_name!r}; sfv_jax ports {CLASS_NAME!r}")
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads"):
            if name in kwargs:
                kwargs[name] = _per_block(kwargs[name], n, name)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        n = len(self.block_out_channels)
        for name in ("in_channels", "out_channels", "num_frames", "addition_time_embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNet config: `{name}` must be a positive integer, got {value!r}")
        if self.sample_size is not None and (not isinstance(self.sample_size, int) or self.sample_size < 1):
            raise ValueError(f"UNet config: `sample_size` must be a positive integer or null, got {self.sample_size!r}")
        for name in ("block_out_channels", "layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            bad = [v for v in getattr(self, name) if isinstance(v, int) and not isinstance(v, bool) and v < 1]
            if bad:
                raise ValueError(f"UNet config: `{name}` entries must be positive, got {list(getattr(self, name))}")
        for name in (
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "num_attention_heads",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNet config: `{name}` needs {n} entries (one per block_out_channels)")
        bad = [t for t in self.down_block_types if t not in (CROSS_DOWN, PLAIN_DOWN)]
        bad += [t for t in self.up_block_types if t not in (CROSS_UP, PLAIN_UP)]
        if bad:
            raise ValueError(f"UNet config: unsupported block types {bad}")
        for c, heads in zip(self.block_out_channels, self.num_attention_heads):
            if c % 32 or c % heads:
                raise ValueError(f"UNet config: {c} channels must divide into 32 groups and {heads} heads")
        if any(isinstance(t, (list, tuple)) for t in self.transformer_layers_per_block):
            raise ValueError("UNet config: per-layer transformer_layers_per_block lists are not supported")

    def to_diffusers(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": CLASS_NAME, **d}

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


class _BlockKit(nn.Module):
    """Base for the UNet's blocks: builds (optionally rematerialised) res / transformer blocks."""

    config: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None

    def _wrap(self, cls):
        if self.remat_policy == "none":
            return cls
        return nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy])

    def resnet(self, out: int, eps: float, name: str) -> nn.Module:
        return self._wrap(SpatioTemporalResBlock)(out, eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def transformer(self, heads: int, layers: int, name: str) -> nn.Module:
        return self._wrap(TransformerSpatioTemporal)(
            heads, layers, self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )


class DownBlock(_BlockKit):
    """``down_blocks.{index}``: [B,F,H,W,C] -> (output [B,F,H',W',C_out], skips pushed, in order)."""

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        cross = cfg.down_block_types[i] == CROSS_DOWN
        skips = []
        for j in range(cfg.layers_per_block[i]):
            x = self.resnet(out, 1e-6 if cross else 1e-5, f"resnets_{j}")(x, temb)
            if cross:
                x = self.transformer(
                    cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i], f"attentions_{j}"
                )(x, context)
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(out, dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return nn.with_logical_constraint(x, VIDEO_AXES), skips


class MidBlock(_BlockKit):
    """``mid_block``: resnet -> transformer -> resnet, all at the last width (GN eps 1e-5)."""

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        c = cfg.block_out_channels[-1]
        x = self.resnet(c, 1e-5, "resnets_0")(x, temb)
        x = self.transformer(cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1], "attentions_0")(
            x, context
        )
        return self.resnet(c, 1e-5, "resnets_1")(x, temb)


class UpBlock(_BlockKit):
    """``up_blocks.{index}``: pops one skip per resnet (concat [hidden, skip]), then upsamples to
    ``upsample_size`` (the next skip's H, W) unless it is the last block. Up resnets use GN eps 1e-6."""

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        cfg = self.config
        rev = len(cfg.block_out_channels) - 1 - self.index  # the mirrored down block
        out = cfg.block_out_channels[rev]
        cross = cfg.up_block_types[self.index] == CROSS_UP
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(out, 1e-6, f"resnets_{j}")(x, temb)
            if cross:
                x = self.transformer(
                    cfg.num_attention_heads[rev], cfg.transformer_layers_per_block[rev], f"attentions_{j}"
                )(x, context)
        if upsample_size is not None:
            x = Upsample2D(out, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(x, upsample_size)
        return nn.with_logical_constraint(x, VIDEO_AXES)


class UNetSpatioTemporal(nn.Module):
    """The SVD UNet. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters.

    ``remat_policy`` ("none", "full", "dots", "dots_no_batch") rematerialises every res block and
    transformer in the backward pass; ``attention_impl`` is passed to ``jax.nn.dot_product_attention``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None

    def setup(self):
        cfg = self.config
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(config=cfg, remat_policy=self.remat_policy, attention_impl=self.attention_impl, **kw)
        n = len(cfg.block_out_channels)
        self.conv_in = conv(cfg.block_out_channels[0], (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, cfg.time_embed_dim, **kw)
        self.add_embedding = TimestepEmbedding(cfg.time_embed_dim, cfg.time_embed_dim, **kw)
        self.down_blocks = [DownBlock(index=i, **blk) for i in range(n)]
        self.mid_block = MidBlock(index=n - 1, **blk)
        self.up_blocks = [UpBlock(index=i, **blk) for i in range(n)]
        self.conv_norm_out = GroupNorm(32, 1e-5, -3, **kw)
        self.conv_out = conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), **kw)

    def _embed(self, sample, timestep, added_time_ids):
        """Time + added-time-id embedding, [B, 4 * C0] (docs/svd_port.md, "UNet embeddings")."""
        cfg = self.config
        b = sample.shape[0]
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: sample must be [B, F, H, W, {cfg.in_channels}], got {tuple(sample.shape)}")
        if added_time_ids.shape != (b, 3):
            raise ValueError(f"UNet: added_time_ids must be [{b}, 3], got {tuple(added_time_ids.shape)}")
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]).astype(self.dtype))
        ids = timestep_embedding(jnp.asarray(added_time_ids, jnp.float32).reshape(-1), cfg.addition_time_embed_dim)
        return emb + self.add_embedding(ids.reshape(b, -1).astype(self.dtype))

    def _down(self, sample, timestep, encoder_hidden_states, added_time_ids):
        emb = self._embed(sample, timestep, added_time_ids)
        x = nn.with_logical_constraint(self.conv_in(sample.astype(self.dtype)), VIDEO_AXES)
        skips, outputs = [x], []
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states)
            skips += block_skips
            outputs.append(x)
        return x, emb, skips, outputs

    def encode(
        self, sample, timestep, encoder_hidden_states, added_time_ids, with_conv_in: bool = False
    ) -> list[jax.Array]:
        """Embeddings + ``conv_in`` + down blocks: each down block's output [B, F, H_i, W_i, C_i];
        ``with_conv_in``: ``conv_in``'s output [B, F, h, w, C_0] first (the latents' own resolution)."""
        _, _, skips, outputs = self._down(sample, timestep, encoder_hidden_states, added_time_ids)
        return [skips[0], *outputs] if with_conv_in else outputs

    def __call__(self, sample, timestep, encoder_hidden_states, added_time_ids) -> jax.Array:
        x, emb, skips, _ = self._down(sample, timestep, encoder_hidden_states, added_time_ids)
        x = self.mid_block(x, emb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            k = self.config.layers_per_block[len(self.up_blocks) - 1 - i] + 1
            skips, block_skips = skips[:-k], skips[-k:]
            size = skips[-1].shape[2:4] if i < len(self.up_blocks) - 1 else None
            x = block(x, block_skips, emb, encoder_hidden_states, size)
        x = self.conv_out(nn.silu(self.conv_norm_out(x)))
        return x


def init_inputs(
    config: UNetConfig,
    batch: int = 1,
    frames: int | None = None,
    height: int = 8,
    width: int = 8,
    dtype: Dtype = jnp.float32,
) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shapes (for ``init`` / ``jax.eval_shape``): latent H, W; frames default
    to ``config.num_frames``."""
    f = frames or config.num_frames
    return (
        jnp.zeros((batch, f, height, width, config.in_channels), dtype),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, 1, config.cross_attention_dim[0]), dtype),
        jnp.zeros((batch, 3), jnp.float32),
    )
