"""Attention and transformer blocks of the SVD UNet: Attention, GEGLU FeedForward,
BasicTransformerBlock (spatial), TemporalBasicTransformerBlock, and TransformerSpatioTemporal
(diffusers ``TransformerSpatioTemporalModel``, docs/svd_port.md, "UNet transformer").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from sfv_jax.models.primitives import GroupNorm, constrain_batch, dense, layer_norm
from sfv_jax.models.resnet import AlphaBlender

Dtype = Any


ATTENTION_IMPLS = (None, "xla", "cudnn", "chunked")
_MAX_QUERY_CHUNK = 128


def _query_chunk(t: int) -> int | None:
    """The largest divisor of ``t`` in [32, 128], or None when chunking would not pay (short or prime-ish)."""
    if t <= 2 * _MAX_QUERY_CHUNK:
        return None
    return next((c for c in range(_MAX_QUERY_CHUNK, 31, -1) if t % c == 0), None)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """[N, H, T, D] x [N, H, S, D] -> [N, H, T, D]; softmax in float32."""
    s = jnp.einsum("nhtd,nhsd->nhts", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    out = jnp.einsum("nhts,nhsd->nhtd", p.astype(v.dtype), v).astype(jnp.float32)
    return (out / p.sum(axis=-1, keepdims=True)).astype(v.dtype)


def compile_platform() -> str:
    """The platform the program being traced compiles for ("cpu", "gpu", "tpu"): the devices of the mesh in
    context (a deviceless compile for a GPU or TPU target traces on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


_FEW_KEYS = 64  # at most this many keys: plain attention's [T, S] scores are no larger than q itself


def cudnn_supports(t: int, s: int, head_dim: int, dtype: Any) -> bool:
    """Whether cuDNN's fused flash attention compiles for ``t`` queries, ``s`` keys, ``head_dim``, ``dtype``
    in training (what JAX checks when it builds the kernel): half precision, a head dim that is a multiple of
    8 up to 128 (256 needs Hopper), even sequence lengths (SVD's cross-attention has one key; SVD-XT's
    temporal attention 25 frames)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and t % 2 == 0
        and s % 2 == 0
    )


def attention_kernel(requested: str | None, t: int, s: int, head_dim: int, dtype: Any, platform: str) -> str:
    """The kernel one attention call uses, "cudnn" | "xla" | "chunked", chosen per call from what the
    platform supports: ``requested`` "cudnn" is a preference, honoured where :func:`cudnn_supports` the
    call on a GPU, else the portable choice (plain "xla" attention for few keys, "chunked" for many: both
    exact, the latter O(tokens) memory); None: "chunked" on a CPU, JAX's "xla" elsewhere."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {requested!r} is not one of {ATTENTION_IMPLS}")
    if requested == "cudnn":
        if platform == "gpu" and cudnn_supports(t, s, head_dim, dtype):
            return "cudnn"
        return "xla" if s <= _FEW_KEYS else "chunked"
    if requested is None:
        return "chunked" if platform == "cpu" else "xla"
    return requested


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str | None = None
) -> jax.Array:
    """Exact softmax attention, ``q`` [N, T, H, D], ``k``/``v`` [N, S, H, D] -> [N, T, H, D].

    The kernel is :func:`attention_kernel`'s choice for this call and the platform being compiled for.
    ``"chunked"`` loops over blocks of <= 128 queries (``lax.map``) so the scores of a block stay in
    cache: on XLA:CPU it is ~2.4x faster than one [T, S] score matrix, and it bounds memory to
    O(block * S) anywhere, gradients included (each block is rematerialised in the backward pass).
    ``"xla"`` / ``"cudnn"`` call ``jax.nn.dot_product_attention`` (cuDNN is the fused flash kernel for bf16 /
    fp16 on NVIDIA GPUs).
    """
    kernel = attention_kernel(implementation, q.shape[1], k.shape[1], q.shape[-1], q.dtype, compile_platform())
    if kernel != "chunked":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=kernel)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [N, H, T, D]
    n, h, t, d = q.shape
    chunk = _query_chunk(t)
    if chunk is None:
        out = _softmax_attention(q, k, v, scale)
    else:
        blocks = q.reshape(n, h, t // chunk, chunk, d).transpose(2, 0, 1, 3, 4)
        # checkpointed per block: the backward recomputes a block's scores instead of keeping every
        # block's (the whole [T, S] matrix), so memory stays O(block * S) in training too
        out = jax.lax.map(jax.checkpoint(lambda qb: _softmax_attention(qb, k, v, scale)), blocks)
        out = out.transpose(1, 2, 0, 3, 4).reshape(n, h, t, d)
    return out.transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (keys ``to_q``, ``to_k``, ``to_v``, ``to_out_0``).

    ``x`` [..., T, C]; ``context`` [..., S, C_ctx] whose leading axes broadcast against x's
    (``None`` = self-attention). Heads split the channels head-major (channel = head * head_dim + d),
    scale head_dim ** -0.5, softmax over keys. Keys and values are projected once per context row and
    then broadcast, so a per-video context is never copied per frame or pixel.
    ``attention_impl``: the preferred kernel; :func:`attention_kernel` decides per call.

    Options mirroring diffusers' ``Attention`` / transformers' ``CLIPAttention``:
    ``group_norm_eps`` (not None): a 32-group ``group_norm`` over the T tokens of each row is applied to
    ``x`` first (the VAE's mid-block attention); ``residual``: the input is added to the output;
    ``names``: the q, k, v and output projections' parameter names (CLIP: q_proj, k_proj, v_proj, out_proj).
    """

    heads: int
    head_dim: int
    out_dim: int | None = None
    qkv_bias: bool = False
    attention_impl: str | None = None
    group_norm_eps: float | None = None
    residual: bool = False
    names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out_0")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        residual = x
        if self.group_norm_eps is not None:
            x = GroupNorm(32, self.group_norm_eps, -2, name="group_norm", **kw)(x)
        x = constrain_batch(x)
        context = x if context is None else constrain_batch(context)
        q_name, k_name, v_name, out_name = self.names

        def project(name, t):  # batch-split in and out: the partitioner gathers the weight, not the samples
            return constrain_batch(dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=name, **kw)(t))

        q, k, v = project(q_name, x), project(k_name, context), project(v_name, context)
        lead = jnp.broadcast_shapes(x.shape[:-2], context.shape[:-2])
        n = math.prod(lead)

        def heads(t: jax.Array) -> jax.Array:
            t = jnp.broadcast_to(t, lead + t.shape[-2:])
            return t.reshape(n, t.shape[-2], self.heads, self.head_dim)

        out = dot_product_attention(heads(q), heads(k), heads(v), self.head_dim**-0.5, self.attention_impl)
        out = constrain_batch(out.reshape(*lead, x.shape[-2], inner))
        out = constrain_batch(dense(self.out_dim or x.shape[-1], ("heads", "embed"), name=out_name, **kw)(out))
        return out + residual.astype(out.dtype) if self.residual else out


class GEGLU(nn.Module):
    """``proj`` Dense(C -> 2 * inner); value = first half, gate = second half; value * GELU_exact(gate)."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.inner_dim, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(
            constrain_batch(x)
        )
        value, gate = jnp.split(constrain_batch(h), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` GEGLU(inner = mult * C) -> ``net_2`` Dense(inner -> out_dim). [..., C] -> [..., out_dim]."""

    out_dim: int | None = None
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = constrain_batch(GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x))
        return constrain_batch(dense(self.out_dim or x.shape[-1], ("mlp", "embed"), name="net_2", **kw)(h))


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to ``context``, GEGLU feed-forward.

    ``x`` [..., T, C]; ``context`` [..., S, C_ctx] (broadcast over x's leading axes). LN eps 1e-5.
    With ``temporal=True`` it is diffusers' TemporalBasicTransformerBlock: a residual GEGLU
    ``ff_in`` after ``norm_in`` comes first (dim == time_mix_inner_dim, so it is residual).
    """

    heads: int
    head_dim: int
    temporal: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, attention_impl=self.attention_impl, **kw)
        if self.temporal:
            x = FeedForward(name="ff_in", **kw)(layer_norm(name="norm_in", **kw)(x)) + x
        x = Attention(name="attn1", **attn)(layer_norm(name="norm1", **kw)(x)) + x
        x = Attention(name="attn2", **attn)(layer_norm(name="norm2", **kw)(x), context) + x
        return FeedForward(name="ff", **kw)(layer_norm(name="norm3", **kw)(x)) + x


class TransformerSpatioTemporal(nn.Module):
    """SVD's spatio-temporal transformer (docs/svd_port.md, "UNet transformer").

    ``x`` [B, F, H, W, C] and ``context`` [B, S, C_ctx] (the image embedding, shared by all frames;
    the temporal blocks use it too, as diffusers uses the first frame's context) -> [B, F, H, W, C].
    GN (per frame, eps 1e-6) -> ``proj_in`` -> per layer: spatial block over the H*W tokens of each
    frame; temporal block over the F frames of each pixel, on the spatial output plus the frame
    positional embedding; ``time_mixer`` a * spatial + (1 - a) * temporal -> ``proj_out`` -> + x.
    """

    heads: int
    num_layers: int = 1
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, f, hgt, wid, c = x.shape
        if c % self.heads:
            raise ValueError(f"TransformerSpatioTemporal: {c} channels do not split into {self.heads} heads")
        blk = dict(heads=self.heads, head_dim=c // self.heads, attention_impl=self.attention_impl, **kw)
        h = GroupNorm(32, 1e-6, -3, name="norm", **kw)(x).reshape(b, f, hgt * wid, c)
        h = dense(c, ("embed", "embed_out"), name="proj_in", **kw)(h)
        ctx = context[:, None].astype(self.dtype)  # [B, 1, S, C_ctx]: broadcast over frames / pixels
        frame_pos = TimestepEmbedding(4 * c, c, name="time_pos_embed", **kw)(
            timestep_embedding(jnp.arange(f), c).astype(self.dtype)
        )  # [F, C]
        mixer = AlphaBlender(0.5, False, self.param_dtype, name="time_mixer")
        for i in range(self.num_layers):
            h = BasicTransformerBlock(name=f"transformer_blocks_{i}", **blk)(h, ctx)
            mix = (h + frame_pos[None, :, None, :]).transpose(0, 2, 1, 3)  # [B, HW, F, C]
            mix = BasicTransformerBlock(temporal=True, name=f"temporal_transformer_blocks_{i}", **blk)(mix, ctx)
            h = mixer(h, mix.transpose(0, 2, 1, 3))
        h = dense(c, ("embed_out", "embed"), name="proj_out", **kw)(h)
        return h.reshape(b, f, hgt, wid, c) + x.astype(h.dtype)
