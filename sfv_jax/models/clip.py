"""Flax port of transformers' ``CLIPVisionModelWithProjection``: SVD's image encoder (docs/svd_port.md, "CLIP").

``CLIPVisionWithProjection.apply({"params": p}, pixel_values [B, 224, 224, 3])`` -> ``image_embeds``
[B, projection_dim] (not L2-normalised; SVD uses it as a one-token cross-attention context).
Pixels are channels-last and already normalised with the CLIP mean / std (``sfv_jax.conditioning``).

Patch conv (no bias) -> prepend ``class_embedding`` -> + ``position_embedding`` -> ``pre_layrnorm`` ->
pre-LN transformer layers -> CLS token -> ``post_layernorm`` -> ``visual_projection`` (no bias).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.attention import Attention
from sfv_jax.models.primitives import conv, dense, layer_norm

Dtype = Any
CLASS_NAME = "CLIPVisionModelWithProjection"

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU (ViT-H/14 of SVD)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``image_encoder/config.json`` that define the network (defaults = SVD's
    OpenCLIP ViT-H/14)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a ``CLIPVisionConfig`` dict (or a full ``CLIPConfig`` with a ``vision_config``)."""
        archs = cfg.get("architectures") or [CLASS_NAME]
        if CLASS_NAME not in archs:
            raise ValueError(f"image encoder config: architectures is {archs}; sfv_jax ports {CLASS_NAME!r}")
        vision = dict(cfg.get("vision_config") or cfg)
        if "vision_config" in cfg and "projection_dim" in cfg:
            vision["projection_dim"] = cfg["projection_dim"]
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in vision.items() if k in known})
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"image encoder config: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"image encoder config: hidden_size {self.hidden_size} does not split into "
                f"{self.num_attention_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image encoder config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    def to_transformers(self) -> dict[str, Any]:
        return {"architectures": [CLASS_NAME], "model_type": "clip_vision_model", **dataclasses.asdict(self)}

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPEmbeddings(nn.Module):
    """``embeddings``: pixels [B, S, S, C] -> tokens [B, 1 + (S/p)^2, D] (CLS first, patches row-major)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        cls_token = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), ("embed",)),
            (d,),
            self.param_dtype,
        )
        patches = conv(
            d,
            (cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=False,
            name="patch_embedding",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(pixels.astype(self.dtype))
        b = patches.shape[0]
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d)), patches.reshape(b, -1, d)], axis=1
        )
        pos = nn.Embed(
            cfg.num_positions,
            d,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="position_embedding",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        return tokens + pos(jnp.arange(cfg.num_positions))[None]


class CLIPMLP(nn.Module):
    """``mlp``: fc1 (D -> intermediate) -> activation -> fc2."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.config.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        return dense(self.config.hidden_size, ("mlp", "embed"), name="fc2", **kw)(
            ACTIVATIONS[self.config.hidden_act](h)
        )


class CLIPEncoderLayer(nn.Module):
    """``layers.{i}``: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x)). [B, T, D] -> [B, T, D]."""

    config: CLIPVisionConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        attn = Attention(
            cfg.num_attention_heads,
            cfg.hidden_size // cfg.num_attention_heads,
            qkv_bias=True,
            attention_impl=self.attention_impl,
            names=("q_proj", "k_proj", "v_proj", "out_proj"),
            name="self_attn",
            **kw,
        )
        x = x + attn(layer_norm(eps, name="layer_norm1", **kw)(x))
        return x + CLIPMLP(cfg, name="mlp", **kw)(layer_norm(eps, name="layer_norm2", **kw)(x))


class CLIPEncoder(nn.Module):
    """``encoder``: the stack of ``layers``."""

    config: CLIPVisionConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.attention_impl, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """``vision_model``: pixels [B, S, S, C] -> pooled CLS feature [B, D] (after ``post_layernorm``)."""

    config: CLIPVisionConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPEmbeddings(cfg, name="embeddings", **kw)(pixels)
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic: the key is spelled so
        x = CLIPEncoder(cfg, self.attention_impl, name="encoder", **kw)(x)
        return layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class CLIPVisionWithProjection(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection``: pixels [B, S, S, C] -> image_embeds [B, projection_dim]."""

    config: CLIPVisionConfig
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"image encoder: pixel_values must be [B, {', '.join(map(str, expected))}], "
                f"got {tuple(pixel_values.shape)}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = CLIPVisionTransformer(cfg, self.attention_impl, name="vision_model", **kw)(pixel_values)
        return dense(cfg.projection_dim, ("embed", "embed_out"), use_bias=False, name="visual_projection", **kw)(pooled)
