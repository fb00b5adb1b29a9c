"""SF-V's discriminator (paper Sec. 3.2-3.3, Fig. 3): the frozen UNet encoder as backbone plus one spatial
and one temporal head after each of its down blocks, with projection conditioning.

The backbone is not a module here: it is ``UNetSpatioTemporal.encode`` (the UNet's own code) applied
with the frozen pretrained parameters, see :func:`discriminator_logits`. Only :class:`DiscriminatorHeads`
has trainable parameters.

Heads (StyleGAN-T style, docs/method.md, "Discriminator"; GroupNorm instead of batch statistics, so every sample
is normalised on its own and micro-batching / sharding cannot change the result):
  spatial  per frame, input reshaped to (B F) x H x W x C:  conv3x3 -> [GN, LReLU, conv3x3] x 2
           residual / sqrt(2) -> LReLU -> conv1x1 to ``proj_dim``
  temporal per pixel, input reshaped to (B H W) x F x C: the same with convs of 3 frames (zero padded)
With ``spectral_norm`` every conv kernel of the head bodies is divided by its largest singular value
(:func:`spectral_normalize`), as StyleGAN-T's and Sana-Sprint's heads do; the projection is left as it is.
Projection (Miyato & Koyama): logit = <phi(h), Affine(c)> / sqrt(proj_dim), per pixel and frame, with
c = [image embedding, sinusoid(c_noise(sigma')), sinusoid(frame index)] (``cond_embedding="paper"``;
"spread" first maps both onto [0, 1000], see ``COND_EMBEDDINGS``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfv_jax.diffusion import edm
from sfv_jax.models.embeddings import timestep_embedding
from sfv_jax.models.primitives import GroupNorm, conv, dense

Dtype = Any
HEAD_KINDS = ("both", "spatial", "temporal")
# How sigma' and the frame index enter the 256-d sinusoids of the conditioning (config ``disc.cond_embedding``):
#   paper   sinusoid(c_noise(sigma')) and sinusoid(frame index), as printed. c_noise = ln(sigma) / 4 spans
#           [-1.55, 1.64] over SVD's whole sigma range against periods of 2 pi .. 2 pi 1e4, so most of the
#           noise sinusoid is constant and Affine(c) barely sees sigma' (docs/method.md, "Discriminator")
#   spread  both inputs mapped onto [0, 1000] first (the UNet's timestep range): c_noise linearly from
#           [c_noise(sigma_min), c_noise(sigma_max)], the frame index from [0, F - 1]
COND_EMBEDDINGS = ("paper", "spread")
# Which backbone maps the heads see (config ``disc.feature_maps``):
#   blocks          each down block's output (the paper: after all 4 down blocks; 1/8 .. 1/64 of the latent size)
#   conv_in+blocks  conv_in's output too, at the latents' own resolution, where fine texture and the small
#                   moving details of a frame still are (an extra spatial and temporal head on it)
FEATURE_MAPS = ("blocks", "conv_in+blocks")


def with_conv_in(feature_maps: str) -> bool:
    """``UNetSpatioTemporal.encode``'s ``with_conv_in`` for ``feature_maps`` (FEATURE_MAPS)."""
    if feature_maps not in FEATURE_MAPS:
        raise ValueError(f"discriminator feature maps {feature_maps!r} is not one of {FEATURE_MAPS}")
    return feature_maps == "conv_in+blocks"


_COND_SINUSOID = 256
_SPREAD = 1000.0


def cond_inputs(sigma: jax.Array, num_frames: int, embedding: str) -> tuple[jax.Array, jax.Array]:
    """The scalars the conditioning sinusoids embed: (noise input [B], frame input [F]), float32."""
    c = edm.c_noise(jnp.asarray(sigma, jnp.float32))
    frames = jnp.arange(num_frames, dtype=jnp.float32)
    if embedding == "paper":
        return c, frames
    if embedding == "spread":
        with jax.ensure_compile_time_eval():  # constants, also while the heads are traced (jit, eval_shape)
            lo, hi = (float(edm.c_noise(jnp.float32(s))) for s in (edm.SIGMA_MIN, edm.SIGMA_MAX))
        return _SPREAD * (c - lo) / (hi - lo), _SPREAD * frames / max(num_frames - 1, 1)
    raise ValueError(f"discriminator cond_embedding {embedding!r} is not one of {COND_EMBEDDINGS}")


SPECTRAL_ITERATIONS = 30  # power iterations on the [out, out] Gram matrix, from the same start every call


def spectral_norm(kernel: jax.Array, iterations: int = SPECTRAL_ITERATIONS) -> jax.Array:
    """The largest singular value of a conv kernel [*window, in, out] as the matrix [window * in, out]
    (the singular values torch's ``spectral_norm`` normalises). Stateless power iteration: no vector is
    carried between steps (no mutable collection in the heads); the direction is found without gradient,
    sigma = ||W v|| is differentiated (the gradient of the top singular value, u v^T)."""
    w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    gram = jax.lax.stop_gradient(w.T @ w)
    v = jnp.full((w.shape[1],), 1.0 / math.sqrt(w.shape[1]), jnp.float32)
    for _ in range(iterations):
        v = gram @ v
        v = v / (jnp.linalg.norm(v) + 1e-12)
    return jnp.linalg.norm(w @ jax.lax.stop_gradient(v))


def spectral_normalize(params: Any) -> Any:
    """Every ``kernel`` leaf of a parameter tree divided by its :func:`spectral_norm` (biases untouched;
    boxed leaves, as at init, stay boxed)."""

    def one(path, x):
        if getattr(path[-1], "key", None) != "kernel":
            return x
        if isinstance(x, nn.meta.AxisMetadata):
            return x.replace_boxed(one(path, x.unbox()))
        return x / spectral_norm(x).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _lrelu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, 0.2)


class HeadBody(nn.Module):
    """The convolutional body of a head. Spatial: [N, H, W, C] -> [N, H, W, proj_dim];
    temporal: [N, F, C] -> [N, F, proj_dim] (convs over 3 neighbouring frames, zero padded)."""

    temporal: bool
    channels: int = 128
    proj_dim: int = 64
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        window, pad = ((3,), ((1, 1),)) if self.temporal else ((3, 3), ((1, 1), (1, 1)))
        axis = -2 if self.temporal else -3
        groups = math.gcd(self.groups, self.channels)

        def block(h, i):
            return _lrelu(GroupNorm(groups, 1e-5, axis, name=f"norm{i}", **kw)(h))

        h = conv(self.channels, window, padding=pad, name="conv_in", **kw)(x.astype(self.dtype))
        r = conv(self.channels, window, padding=pad, name="res_conv1", **kw)(block(h, 1))
        r = conv(self.channels, window, padding=pad, name="res_conv2", **kw)(block(r, 2))
        h = (h + r) * (1.0 / math.sqrt(2.0))
        return conv(self.proj_dim, (1,) * len(window), padding=((0, 0),) * len(window), name="conv_out", **kw)(
            _lrelu(h)
        )


class ProjectionHead(nn.Module):
    """A head with its conditioning projection: features [B, F, H, W, C] and c [B, F, D_c] -> logits [B, F, H, W]."""

    temporal: bool
    channels: int = 128
    proj_dim: int = 64
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, feats: jax.Array, cond: jax.Array) -> jax.Array:
        b, f, h, w, c = feats.shape
        body_cls = HeadBody
        if self.spectral_norm:  # the same parameters, read through spectral_normalize
            body_cls = nn.map_variables(HeadBody, "params", trans_in_fn=spectral_normalize, init=True)
        body = body_cls(
            self.temporal, self.channels, self.proj_dim, self.groups, self.dtype, self.param_dtype, name="body"
        )
        if self.temporal:
            phi = body(feats.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, c))  # (B H W) x F x C
            phi = phi.reshape(b, h, w, f, -1).transpose(0, 3, 1, 2, 4)
        else:
            phi = body(feats.reshape(b * f, h, w, c)).reshape(b, f, h, w, -1)  # (B F) x H x W x C
        e = dense(self.proj_dim, ("embed", "mlp"), name="cond_proj", dtype=self.dtype, param_dtype=self.param_dtype)(
            cond
        )  # Affine(c): [B, F, proj_dim]
        acc = jnp.promote_types(phi.dtype, jnp.float32)
        logits = jnp.einsum("bfhwk,bfk->bfhw", phi.astype(acc), e.astype(acc))
        return logits / math.sqrt(self.proj_dim)


class DiscriminatorHeads(nn.Module):
    """Spatial and/or temporal heads on each backbone feature map (paper: both, after all 4 down blocks).

    ``features``: list of [B, F, H_i, W_i, C_i]; ``image_embeds`` [B, D]; ``sigma`` [B] (the
    discriminator's sigma'). Returns a list of logits maps [B, F, H_i, W_i], spatial heads first.
    Parameters ``spatial_{i}`` / ``temporal_{i}``.
    """

    heads: str = "both"
    channels: int = 128
    proj_dim: int = 64
    groups: int = 32  # GroupNorm groups of the head bodies (gcd with ``channels``)
    cond_embedding: str = "paper"  # COND_EMBEDDINGS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    spectral_norm: bool = False  # the head bodies' conv kernels divided by their largest singular value
    feature_maps: str = "blocks"  # FEATURE_MAPS: the backbone maps the heads see (backbone_features)

    def logit_kinds(self, num_logits: int) -> list[str]:
        """The kind ("spatial" | "temporal") of each of the ``num_logits`` maps the heads return."""
        kinds = ("spatial", "temporal") if self.heads == "both" else (self.heads,)
        return [k for k in kinds for _ in range(num_logits // len(kinds))]

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_embeds: jax.Array, sigma: jax.Array) -> list[jax.Array]:
        if self.heads not in HEAD_KINDS:
            raise ValueError(f"discriminator heads {self.heads!r} is not one of {HEAD_KINDS}")
        b, f = features[0].shape[:2]
        noise_in, frame_in = cond_inputs(jnp.asarray(sigma).reshape(b), f, self.cond_embedding)
        noise_emb = timestep_embedding(noise_in, _COND_SINUSOID)
        frame_emb = timestep_embedding(frame_in, _COND_SINUSOID)
        cond = jnp.concatenate(
            [
                jnp.broadcast_to(image_embeds.astype(noise_emb.dtype)[:, None], (b, f, image_embeds.shape[-1])),
                jnp.broadcast_to(noise_emb[:, None], (b, f, _COND_SINUSOID)),
                jnp.broadcast_to(frame_emb[None], (b, f, _COND_SINUSOID)),
            ],
            axis=-1,
        )
        kinds = {"both": (False, True), "spatial": (False,), "temporal": (True,)}[self.heads]
        out = []
        for temporal in kinds:
            for i, feats in enumerate(features):
                name = f"{'temporal' if temporal else 'spatial'}_{i}"
                out.append(
                    ProjectionHead(
                        temporal,
                        self.channels,
                        self.proj_dim,
                        self.groups,
                        self.dtype,
                        self.param_dtype,
                        self.spectral_norm,
                        name=name,
                    )(feats, cond.astype(self.dtype))
                )
        return out


def backbone_features(
    unet: nn.Module,
    backbone_params: Any,
    x_noisy: jax.Array,
    sigma: jax.Array,
    cond: dict,
    feature_maps: str = "blocks",
) -> list[jax.Array]:
    """The frozen UNet encoder on noisy latents (paper Eq. 8, 11: D sees c_in(sigma') x'_t with c_noise(sigma')).

    ``x_noisy`` [B, F, h, w, 4]; ``sigma`` [B]; ``cond``: ``image_latents`` [B, h, w, 4] (unscaled),
    ``image_embeds`` [B, D], ``added_time_ids`` [B, 3]. Returns the down-block outputs, after ``conv_in``'s
    output with ``feature_maps="conv_in+blocks"`` (FEATURE_MAPS)."""
    s = jnp.asarray(sigma, jnp.float32)
    x_in = x_noisy.astype(jnp.float32) / jnp.sqrt(s * s + 1.0).reshape(-1, 1, 1, 1, 1)
    image_latents = jnp.broadcast_to(cond["image_latents"][:, None], x_in.shape[:-1] + cond["image_latents"].shape[-1:])
    sample = jnp.concatenate([x_in, image_latents.astype(jnp.float32)], axis=-1)
    return unet.apply(
        {"params": backbone_params},
        sample,
        edm.c_noise(s),
        cond["image_embeds"][:, None],
        cond["added_time_ids"],
        with_conv_in(feature_maps),
        method=unet.encode,
    )


def discriminator_logits(
    unet: nn.Module,
    backbone_params: Any,
    heads: DiscriminatorHeads,
    head_params: Any,
    x_noisy: jax.Array,
    sigma: jax.Array,
    cond: dict,
) -> list[jax.Array]:
    """D_phi(c_in(sigma') x'_t; c_noise(sigma'), c): backbone then heads -> list of logits [B, F, H_i, W_i]."""
    feats = backbone_features(unet, backbone_params, x_noisy, sigma, cond, heads.feature_maps)
    return heads.apply({"params": head_params}, feats, cond["image_embeds"], sigma)


def backbone_subset(unet_tree: Any, whole: bool = False) -> dict:
    """The entries of a UNet parameter tree (or a tree of its shardings, shapes ...) that
    ``UNetSpatioTemporal.encode`` reads: embeddings, conv_in, down blocks (a view, nothing copied).
    ``whole``: every entry, the whole frozen teacher (the generator step's distillation term runs all of it;
    the discriminator still reads only its encoder)."""
    keep = ("conv_in", "time_embedding", "add_embedding")
    return {k: v for k, v in unet_tree.items() if whole or k in keep or k.startswith("down_blocks_")}


def backbone_param_subset(unet_params: Any, whole: bool = False) -> dict:
    """A copy of :func:`backbone_subset` of the parameters: the frozen backbone (or teacher). It is a copy, not
    a view: the generator's own buffers are updated (and donated) by every step, the backbone's never change."""
    return jax.tree.map(jnp.copy, backbone_subset(unet_params, whole))
