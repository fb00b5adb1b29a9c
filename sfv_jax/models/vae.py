"""Flax port of diffusers' ``AutoencoderKLTemporalDecoder``: SVD's VAE (docs/svd_port.md, "VAE").

* The encoder is the standard 2-D SD VAE encoder, per image: ``[N, H, W, 3]`` -> posterior moments
  ``[N, H/8, W/8, 2L]`` (after ``quant_conv``); the pipeline uses the posterior *mean* (``encode``).
* The decoder is temporal: ``[B, F, h, w, L]`` -> ``[B, F, 8h, 8w, 3]``. Its spatio-temporal res blocks
  (``switch_spatial_to_temporal_mix=True``, temporal GroupNorm eps 1e-5) and its final
  ``time_conv_out`` mix the F frames given to one decode call, so chunked decoding (``decode_latents``
  with ``chunk_size``) changes the result exactly as it does in diffusers.

Images are in [-1, 1]. Latents here are *unscaled* (multiply by ``scaling_factor`` for the UNet, as
diffusers does in its pipeline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.attention import Attention
from sfv_jax.models.primitives import GroupNorm, conv
from sfv_jax.models.resnet import Downsample2D, ResnetBlock, SpatioTemporalResBlock, TemporalConv, Upsample2D

Dtype = Any
CLASS_NAME = "AutoencoderKLTemporalDecoder"
_VAE_EPS = 1e-6  # every spatial GroupNorm of the VAE
_TEMPORAL_EPS = 1e-5  # the temporal res blocks' GroupNorm (pooled over the frames of a decode call)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``vae/config.json`` that define the network (defaults = SVD)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 768
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> VAEConfig:
        cls_name = cfg.get("_class_name", CLASS_NAME)
        if cls_name != CLASS_NAME:
            raise ValueError(f"VAE config: _class_name is {cls_name!r}; sfv_jax ports {CLASS_NAME!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known}
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("VAE config: `down_block_types` needs one entry per `block_out_channels`")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        if bad:
            raise ValueError(f"VAE config: unsupported down block types {bad} (only DownEncoderBlock2D)")
        if any(c % 32 for c in self.block_out_channels):
            raise ValueError(
                f"VAE config: block_out_channels {list(self.block_out_channels)} must divide into 32 groups"
            )
        if self.layers_per_block != 2:
            # diffusers' MidBlockTemporalDecoder builds layers_per_block res blocks but runs only two
            # (res, attention, res); 2 is the only value where every weight is used (SVD's value).
            raise ValueError(f"VAE config: layers_per_block is {self.layers_per_block}; sfv_jax supports 2 (SVD)")

    def to_diffusers(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": CLASS_NAME, **d}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class _Common(nn.Module):
    """Shared fields and layer factories of the VAE's sub-modules."""

    config: VAEConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv3(self, features: int, name: str) -> nn.Module:
        return conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name, **self.kw)

    def res(self, out: int, temporal: bool, name: str) -> nn.Module:
        """Encoder: ResnetBlock2D without temb. Decoder: SpatioTemporalResBlock, VAE flavour."""
        if temporal:
            return SpatioTemporalResBlock(
                out,
                _VAE_EPS,
                temporal_eps=_TEMPORAL_EPS,
                use_temb=False,
                switch_spatial_to_temporal_mix=True,
                name=name,
                **self.kw,
            )
        return ResnetBlock(out, _VAE_EPS, use_temb=False, name=name, **self.kw)


class VAEMidBlock(_Common):
    """``mid_block``: res -> single-head self-attention over each image's H*W tokens (GroupNorm first,
    residual, q/k/v with bias, scale C**-0.5) -> res. ``x`` [..., H, W, C] -> same shape."""

    temporal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = self.res(c, self.temporal, "resnets_0")(x)
        tokens = x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], c)
        tokens = Attention(
            1,
            c,
            qkv_bias=True,
            attention_impl=self.attention_impl,
            group_norm_eps=_VAE_EPS,
            residual=True,
            name="attentions_0",
            **self.kw,
        )(tokens)
        return self.res(c, self.temporal, "resnets_1")(tokens.reshape(x.shape))


class VAEEncoderBlock(_Common):
    """``down_blocks.{index}`` (DownEncoderBlock2D): res blocks, then a stride-2 conv with (0, 1) padding
    (all but the last block). [N, H, W, C] -> [N, H', W', C_out]."""

    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        for j in range(cfg.layers_per_block):
            x = self.res(out, False, f"resnets_{j}")(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(out, padding=((0, 1), (0, 1)), name="downsamplers_0", **self.kw)(x)
        return x


class VAEEncoder(_Common):
    """``encoder``: conv_in -> down blocks -> mid block -> GN -> SiLU -> conv_out (2L channels).
    ``x`` [N, H, W, in_channels] -> [N, H/8, W/8, 2 * latent_channels]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = self.conv3(cfg.block_out_channels[0], "conv_in")(x.astype(self.dtype))
        for i in range(len(cfg.block_out_channels)):
            x = VAEEncoderBlock(cfg, self.attention_impl, index=i, name=f"down_blocks_{i}", **self.kw)(x)
        x = VAEMidBlock(cfg, self.attention_impl, name="mid_block", **self.kw)(x)
        x = nn.silu(GroupNorm(32, _VAE_EPS, -3, name="conv_norm_out", **self.kw)(x))
        return self.conv3(2 * cfg.latent_channels, "conv_out")(x)


class VAEDecoderBlock(_Common):
    """``up_blocks.{index}`` (UpBlockTemporalDecoder): layers_per_block + 1 spatio-temporal res blocks,
    then nearest x2 + conv (all but the last block). [B, F, h, w, C] -> [B, F, h', w', C_out]."""

    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[::-1][i]
        for j in range(cfg.layers_per_block + 1):
            x = self.res(out, True, f"resnets_{j}")(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Upsample2D(out, name="upsamplers_0", **self.kw)(x)
        return x


class TemporalDecoder(_Common):
    """``decoder``: conv_in -> temporal mid block -> temporal up blocks -> GN -> SiLU -> conv_out ->
    ``time_conv_out`` (Conv3d (3, 1, 1) over frames). ``z`` [B, F, h, w, L] -> [B, F, 8h, 8w, out_channels]."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        x = self.conv3(cfg.block_out_channels[-1], "conv_in")(z.astype(self.dtype))
        x = VAEMidBlock(cfg, self.attention_impl, temporal=True, name="mid_block", **self.kw)(x)
        for i in range(len(cfg.block_out_channels)):
            x = VAEDecoderBlock(cfg, self.attention_impl, index=i, name=f"up_blocks_{i}", **self.kw)(x)
        x = nn.silu(GroupNorm(32, _VAE_EPS, -3, name="conv_norm_out", **self.kw)(x))
        x = self.conv3(cfg.out_channels, "conv_out")(x)
        return TemporalConv(cfg.out_channels, name="time_conv_out", **self.kw)(x)


class AutoencoderKLTemporalDecoder(nn.Module):
    """SVD's VAE. ``dtype`` is the compute dtype, ``param_dtype`` the parameters' storage dtype.

    Methods (use with ``apply(..., method=...)``):
      ``encode(x [N, H, W, 3]) -> mean [N, H/8, W/8, L]``             posterior mode (what SVD uses)
      ``encode_moments(x) -> (mean, logvar)``                         logvar clamped to [-30, 20]
      ``decode(z [B, F, h, w, L]) -> [B, F, 8h, 8w, 3]``              one decode call: frames mix within it
      ``__call__(x [B, F, H, W, 3])``: encode every frame (mean) and decode the video (used by ``init``)
    """

    config: VAEConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VAEEncoder(self.config, self.attention_impl, **kw)
        self.quant_conv = conv(2 * self.config.latent_channels, (1, 1), padding=((0, 0), (0, 0)), **kw)
        self.decoder = TemporalDecoder(self.config, self.attention_impl, **kw)

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        f = self.config.downsample_factor if what == "image" else 1
        if x.shape[-1] != channels or x.shape[-2] % f or x.shape[-3] % f:
            raise ValueError(
                f"VAE: {what} must be [..., H, W, {channels}] with H, W multiples of {f}, got {tuple(x.shape)}"
            )

    def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        self._check(x, self.config.in_channels, "image")
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encode_moments(x)[0]

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 5:
            raise ValueError(f"VAE: decode takes latents [B, F, h, w, L], got {tuple(z.shape)}")
        self._check(z, self.config.latent_channels, "latent")
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f = x.shape[:2]
        mean = self.encode(x.reshape(b * f, *x.shape[2:]))
        return self.decode(mean.reshape(b, f, *mean.shape[1:]))


def decode_latents(
    vae: AutoencoderKLTemporalDecoder, params: Any, latents: jax.Array, chunk_size: int | None = None
) -> jax.Array:
    """diffusers' ``StableVideoDiffusionPipeline.decode_latents`` (docs/svd_port.md, "VAE decoding"), a pure function.

    ``latents`` [B, F, h, w, L] (scaled, as the UNet sees them) are divided by ``scaling_factor``,
    flattened to B*F rows (frame fastest) and decoded ``chunk_size`` rows at a time (default F), each
    chunk as one clip of ``len(chunk)`` frames. Equal chunks run under ``lax.map`` (one compiled decoder
    however many chunks); a shorter last chunk is one more call. -> [B, F, 8h, 8w, 3], about [-1, 1].
    """
    b, f = latents.shape[:2]
    chunk = chunk_size or f
    if chunk < 1:
        raise ValueError(f"VAE: decode chunk size must be >= 1, got {chunk_size}")
    n = b * f
    rows = (latents / vae.config.scaling_factor).reshape(n, *latents.shape[2:])

    def decode(clip: jax.Array) -> jax.Array:  # [c, h, w, L] -> [c, H, W, 3]
        return vae.apply({"params": params}, clip[None], method=vae.decode)[0]

    full = (n // chunk) * chunk
    parts = []
    if full:
        blocks = rows[:full].reshape(n // chunk, chunk, *rows.shape[1:])
        mapped = jax.lax.map(decode, blocks)  # [n // chunk, chunk, H, W, 3]
        parts.append(mapped.reshape(full, *mapped.shape[2:]))
    if full < n:
        parts.append(decode(rows[full:]))
    out = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return out.reshape(b, f, *out.shape[1:])
