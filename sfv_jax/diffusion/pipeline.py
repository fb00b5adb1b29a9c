"""The image-to-video pipeline in JAX: CLIP embedding + VAE latent -> UNet sampler -> temporal VAE decode.

    pipe = pretrained.load_pipeline("stable-video-diffusion-img2vid", dtype=jnp.bfloat16)
    frames = pipe(image)                                   # SVD teacher: 25 Euler steps, guidance 1 -> 3
    frames = pipe(image, sampler="sfv")                    # SF-V: one forward pass from sigma_max
    frames.shape == (14, 576, 1024, 3)                     # float32 in [0, 1]
    pipe.last_timings                                      # seconds per stage of the last call

The arguments mirror diffusers' ``StableVideoDiffusionPipeline.__call__`` and the numerics follow it
(docs/svd_port.md): CLIP preprocessing of the raw image; the VAE image resized with PIL LANCZOS,
noise-augmented, encoded to its posterior mean (unscaled, float32); added_time_ids [fps - 1,
motion_bucket_id, noise_aug_strength]; zero embeddings and latents for the unconditional half, batch
order [uncond, cond]; per-frame guidance linspace(min, max, F); decode in chunks of
``decode_chunk_size`` frames. Each stage is jitted and compiled once per module, shape and option set
(``compile_count``), compilation timed apart from execution; pipelines with equal modules (a teacher and
the SF-V generator trained from it) share their compiled stages, since the parameters are arguments.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sfv_jax import programs
from sfv_jax.diffusion import conditioning, edm, samplers
from sfv_jax.diffusion.generation import SAMPLERS, GenerationSettings
from sfv_jax.models.vae import decode_latents

STAGES = ("image_encoder", "vae_encode", "unet", "vae_decode")


def _mesh_spec(a: Any) -> str | tuple:
    """How an argument is split over a mesh (after :meth:`SVDPipeline.shard`): its sharding and the mesh's
    device ids; "" for one device / numpy."""
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return ""
    return str(sharding), tuple(d.id for d in sharding.mesh.devices.flat)


def velocity_fn(unet: nn.Module, params, image_latents, embeds, added_time_ids, scales) -> edm.VelocityFn:
    """The UNet with its conditioning bound. With ``scales`` (per-frame guidance), the batch is doubled
    [uncond, cond] with zero latents / embeddings for the unconditional half."""
    b = image_latents.shape[0]
    if scales is not None:
        null_latents, null_embeds = samplers.null_condition(image_latents, embeds)
        image_latents = jnp.concatenate([null_latents, image_latents])
        embeds = jnp.concatenate([null_embeds, embeds])
        added_time_ids = jnp.concatenate([added_time_ids, added_time_ids])

    def velocity(x_in, c_noise):
        if scales is not None:
            x_in = jnp.concatenate([x_in, x_in])
        sample = jnp.concatenate([x_in.astype(image_latents.dtype), image_latents], axis=-1)
        v = unet.apply({"params": params}, sample, c_noise, embeds, added_time_ids).astype(jnp.float32)
        return v if scales is None else samplers.apply_guidance(v[:b], v[b:], scales)

    return velocity


def sampling_program(unet: nn.Module, sampler: str) -> Callable:
    """The pipeline's UNet stage as a pure function (jit it, or compile it for a target):
    ``(params, noise, image_latents, embeds, added_time_ids, sigmas, scales) -> latents`` with the shapes of
    :meth:`SVDPipeline.sample_latents`; ``scales`` None: no guidance."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    dtype = unet.dtype

    def fn(params, noise, image_latents, embeds, ids, sigmas, scales):
        velocity = velocity_fn(unet, params, image_latents.astype(dtype), embeds.astype(dtype), ids, scales)
        run = samplers.euler_sample if sampler == "svd" else samplers.sfv_sample
        return run(velocity, noise, sigmas)

    return fn


@dataclasses.dataclass
class SVDPipeline:
    """The SVD / SF-V image-to-video pipeline (build it with :func:`sfv_jax.checkpoint.pretrained.load_pipeline`)."""

    unet: nn.Module
    unet_params: Any
    vae: nn.Module
    vae_params: Any
    image_encoder: nn.Module
    image_encoder_params: Any
    clip_mean: tuple[float, ...] = conditioning.CLIP_MEAN
    clip_std: tuple[float, ...] = conditioning.CLIP_STD
    last_timings: dict[str, float] = dataclasses.field(default_factory=dict)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _mesh: Mesh | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_components(
        cls,
        unet: tuple[nn.Module, Any],
        vae: tuple[nn.Module, Any],
        image_encoder: tuple[nn.Module, Any],
        folder: str | Path | None = None,
    ) -> SVDPipeline:
        """From ``(module, params)`` pairs; ``folder`` (an SVD folder) supplies the CLIP normalisation."""
        mean, std = (
            conditioning.clip_normalization(folder) if folder else (conditioning.CLIP_MEAN, conditioning.CLIP_STD)
        )
        pipe = cls(unet[0], unet[1], vae[0], vae[1], image_encoder[0], image_encoder[1], tuple(mean), tuple(std))
        pipe._check_components()
        return pipe

    def _check_components(self) -> None:
        u, v, c = self.unet.config, self.vae.config, self.image_encoder.config
        problems = []
        if u.in_channels != 2 * v.latent_channels or u.out_channels != v.latent_channels:
            problems.append(
                f"the UNet takes {u.in_channels} -> {u.out_channels} channels but the VAE's latents have "
                f"{v.latent_channels} (SVD: 8 = noisy ++ image latent -> 4)"
            )
        if u.cross_attention_dim[0] != c.projection_dim:
            problems.append(
                f"the UNet's cross_attention_dim is {u.cross_attention_dim[0]} but the image encoder "
                f"projects to {c.projection_dim}"
            )
        if u.projection_class_embeddings_input_dim != 3 * u.addition_time_embed_dim:
            problems.append(
                "the UNet's projection_class_embeddings_input_dim must be 3 x addition_time_embed_dim "
                "(fps, motion bucket, noise augmentation)"
            )
        if problems:
            raise ValueError("the pipeline's components do not fit together: " + "; ".join(problems))

    def shard(self, devices: Sequence[Any] | None = None) -> SVDPipeline:
        """Split every batch of :meth:`generate` over ``devices`` (default: this process's local devices;
        batches are padded to a multiple of their number); the parameters are replicated on each."""
        devices = list(devices) if devices is not None else jax.local_devices()
        if len(devices) == 1 and devices[0] == jax.devices()[0]:
            self._mesh = None  # one (the default) device: nothing to split; the executables stay the same
            return self
        self._mesh = Mesh(np.asarray(devices), ("batch",))
        replicated = NamedSharding(self._mesh, P())
        self.unet_params, self.vae_params, self.image_encoder_params = jax.device_put(
            (self.unet_params, self.vae_params, self.image_encoder_params), replicated
        )
        return self

    @property
    def num_devices(self) -> int:
        return 1 if self._mesh is None else self._mesh.size

    def _put(self, x: Any, axis: int = 0) -> jax.Array:
        """``x`` split over the devices along its batch ``axis`` (unchanged without :meth:`shard`)."""
        if self._mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self._mesh, P(*([None] * axis), "batch")))

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def compile_count(self) -> int:
        """Executables this pipeline has run (one per stage, shape and static option set), compiled by it or
        by an earlier pipeline with equal modules."""
        return len(self._compiled)

    # ------------------------------------------------------------------------------------------ stages

    def _run(self, stage: str, module: nn.Module, fn: Callable, args: tuple, static: tuple = ()) -> Any:
        """Run ``fn(*args)`` jitted, compiling once per (stage, ``module`` (what ``fn`` applies), static options,
        argument shapes) in this process; the compile and run times are added to ``last_timings``."""
        # kept per process (sfv_jax.programs): a stage's program depends on its module's definition (modules
        # compare by value), never on parameter values
        key = (
            "pipeline",
            stage,
            module,
            static,
            jax.tree.structure(args),
            tuple(
                (
                    tuple(np.shape(a)),
                    str(np.asarray(a).dtype) if not isinstance(a, jax.Array) else str(a.dtype),
                    _mesh_spec(a),
                )
                for a in jax.tree.leaves(args)
            ),
        )
        if key not in self._compiled:

            def compile_timed():
                t0 = time.perf_counter()
                executable = jax.jit(fn).lower(*args).compile()
                self.last_timings["compile"] = self.last_timings.get("compile", 0.0) + time.perf_counter() - t0
                return executable

            self._compiled[key] = programs.jitted(key, compile_timed)
        t0 = time.perf_counter()
        out = jax.block_until_ready(self._compiled[key](*args))
        self.last_timings[stage] = self.last_timings.get(stage, 0.0) + time.perf_counter() - t0
        return out

    def encode_image(self, clip_pixels: np.ndarray) -> jax.Array:
        """CLIP ``image_embeds`` [B, D] of normalised pixels [B, S, S, 3]."""
        model = self.image_encoder
        return self._run(
            "image_encoder",
            model,
            lambda p, x: model.apply({"params": p}, x),
            (self.image_encoder_params, jnp.asarray(clip_pixels)),
        )

    def encode_vae(self, pixels: jax.Array) -> jax.Array:
        """Posterior mean [B, h, w, L] of images [B, H, W, 3] in [-1, 1], computed in float32 (as diffusers'
        ``force_upcast`` does for half-precision VAEs)."""
        model = self.vae.clone(dtype=jnp.float32)
        return self._run(
            "vae_encode",
            model,
            lambda p, x: model.apply({"params": p}, x, method=model.encode),
            (self.vae_params, jnp.asarray(pixels, jnp.float32)),
        )

    def decode(self, latents: jax.Array, chunk_size: int | None = None) -> jax.Array:
        """Scaled latents [B, F, h, w, L] -> frames [B, F, H, W, 3] in [0, 1] (decoded ``chunk_size`` frames
        per call, then postprocessed as diffusers: clamp(x / 2 + 0.5, 0, 1))."""
        model = self.vae

        def fn(p, z):
            x = decode_latents(model, p, z, chunk_size).astype(jnp.float32)
            return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

        return self._run("vae_decode", model, fn, (self.vae_params, latents), static=(chunk_size,))

    def sample_latents(
        self,
        noise: jax.Array,
        image_latents: jax.Array,
        embeds: jax.Array,
        added_time_ids: jax.Array,
        sigmas: np.ndarray,
        *,
        sampler: str = "svd",
        scales: jax.Array | None = None,
    ) -> jax.Array:
        """Run a sampler over the UNet. ``image_latents`` [B, F, h, w, L] (unscaled posterior means),
        ``embeds`` [B, 1, D], ``added_time_ids`` [B, 3], ``noise`` [B, F, h, w, L] (svd) or
        [n, B, F, h, w, L] (sfv), ``scales`` [F] enables guidance. -> latents [B, F, h, w, L]."""
        args = (self.unet_params, noise, image_latents, embeds, added_time_ids, jnp.asarray(sigmas), scales)
        return self._run("unet", self.unet, sampling_program(self.unet, sampler), args, static=(sampler,))

    # ------------------------------------------------------------------------------------------ __call__

    def __call__(
        self,
        image: Any,
        height: int = 576,
        width: int = 1024,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        sfv_guidance: bool = False,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        seed: int = 0,
        latents: Any = None,
        sampler: str = "svd",
    ) -> np.ndarray:
        """Generate a video from ``image`` (PIL image, (H, W, 3) uint8 array, or a path), with diffusers'
        keyword arguments (each a field of :class:`sfv_jax.diffusion.generation.GenerationSettings`, which
        documents them).

        ``num_inference_steps``: default 25 for ``sampler="svd"`` (the teacher: Euler, guidance
        linspace(min_guidance_scale, max_guidance_scale, F), on when max > 1) and 1 for ``"sfv"`` (the
        SF-V generator: 1-3 steps, guided the same way only with ``sfv_guidance``; ``"sfv_grid"``: 1-4, the
        4th at an untrained level).
        ``latents``: unit Gaussian noise (1, F, h, w, 4), scaled
        inside as diffusers scales it (with ``"sfv"`` and n > 1 steps the re-noising draws come from
        ``seed``). ``seed`` drives every random draw (noise augmentation, initial noise). Returns
        float32 frames (F, height, width, 3) in [0, 1]; per-stage seconds in ``last_timings``.
        """
        settings = GenerationSettings(
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            min_guidance_scale=min_guidance_scale,
            max_guidance_scale=max_guidance_scale,
            sfv_guidance=sfv_guidance,
            fps=fps,
            motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength,
            decode_chunk_size=decode_chunk_size,
            sampler=sampler,
        )
        return self.generate([image], [seed], settings, latents=latents)[0]

    def generate(
        self,
        images: Sequence[Any],
        seeds: Sequence[int],
        settings: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen: one shared default is safe)
        *,
        latents: Any = None,
    ) -> np.ndarray:
        """A batch of videos: video ``i`` from ``images[i]`` with ``seeds[i]``, equal to
        ``pipe(images[i], seed=seeds[i], ...)`` (each video draws its noise from its own seed, so it does not
        depend on the batch it is in nor on the devices). ``latents`` [B, F, h, w, 4]. After :meth:`shard` the
        batch is split over the devices. -> float32 [B, F, height, width, 3] in [0, 1]; ``last_timings``
        holds the seconds of each stage for the batch."""
        if len(images) != len(seeds) or not len(images):
            raise ValueError(f"generate needs one seed per image; got {len(images)} images and {len(seeds)} seeds")
        self.last_timings = {}
        g, factor = settings, self.vae_scale_factor
        height, width, sampler, steps = g.height, g.width, g.sampler, g.steps
        conditioning.check_size(height, width, math.lcm(8, factor))
        num_frames = self.unet.config.num_frames if g.num_frames is None else g.num_frames
        if sampler == "svd":
            sigmas = edm.euler_sigmas(steps)
        else:
            sigmas = edm.sfv_sigmas(steps, untrained=sampler == "sfv_grid")
        h, w, ch = height // factor, width // factor, self.vae.config.latent_channels
        b = len(images)
        shape = (b, num_frames, h, w, ch)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise ValueError(
                f"latents must have shape {shape} (batch, num_frames, height/{factor}, width/{factor}, "
                f"{ch}) for num_frames={num_frames}, height={height}, width={width}; "
                f"got {tuple(np.shape(latents))}"
            )
        pad = -b % self.num_devices  # a sharded batch: repeat the last video, dropped at the end
        images = [conditioning.load_image(im) for im in images]
        images += images[-1:] * pad
        seeds = list(seeds) + [seeds[-1]] * pad
        if latents is not None and pad:
            latents = np.concatenate([np.asarray(latents), np.repeat(np.asarray(latents)[-1:], pad, axis=0)])
        shape = (b + pad, *shape[1:])
        keys = [jax.random.split(jax.random.PRNGKey(s), 3) for s in seeds]  # aug, noise, renoise per video

        def draw(which: int, sample_shape: tuple, axis: int = 0) -> jax.Array:
            return jnp.concatenate([jax.random.normal(k[which], sample_shape) for k in keys], axis=axis)

        # 1. CLIP image embedding of the raw image -> [B, 1, D]
        size = self.image_encoder.config.image_size
        clip_px = np.stack([conditioning.clip_pixels(im, size, self.clip_mean, self.clip_std) for im in images])
        embeds = self.encode_image(self._put(clip_px))[:, None, :]
        # 2. VAE conditioning latent: resized image + noise augmentation -> posterior mean (unscaled)
        pixels = jnp.asarray(np.stack([conditioning.vae_pixels(im, height, width, factor) for im in images]))
        pixels = pixels + g.noise_aug_strength * draw(0, (1, height, width, 3))
        image_latents = self.encode_vae(self._put(pixels))
        image_latents = self._put(jnp.broadcast_to(image_latents[:, None], shape))
        ids = self._put(
            jnp.tile(jnp.asarray([[g.fps - 1, g.motion_bucket_id, g.noise_aug_strength]], jnp.float32), (shape[0], 1))
        )
        # 3. sampling
        noise = jnp.asarray(latents, jnp.float32) if latents is not None else draw(1, (1, *shape[1:]))
        scales = samplers.guidance_scales(g.min_guidance_scale, g.max_guidance_scale, num_frames) if g.guided else None
        if sampler == "svd":
            out = self.sample_latents(
                self._put(noise), image_latents, embeds, ids, sigmas, sampler="svd", scales=scales
            )
        else:
            renoise = draw(2, (len(sigmas) - 1, 1, *shape[1:]), axis=1)
            out = self.sample_latents(
                self._put(jnp.concatenate([noise[None], renoise]), axis=1),
                image_latents,
                embeds,
                ids,
                sigmas,
                sampler="sfv",
                scales=scales,
            )
        # 4. decode
        frames = self.decode(out, g.decode_chunk_size)
        self.last_timings["unet_steps"] = float(steps)
        return np.asarray(frames, np.float32)[:b]
