"""The JAX image-to-video pipeline against diffusers' StableVideoDiffusionPipeline (tiny random
components, written as a diffusers folder and converted), the SF-V sampler, and bad inputs."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import rel_err

from sfv_jax.checkpoint import pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.diffusion import edm, pipeline, samplers
from sfv_jax.diffusion.conditioning import ImageError
from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.models import presets

H, W, F = 48, 40, 5  # TINY_VAE downsamples by 4: latents 12 x 10, TINY_B's test size
LATENT = (1, F, H // 4, W // 4, 4)
E2E_TOL = 1e-3  # max |jax - diffusers| of frames in [0, 1]


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(1).standard_normal(LATENT).astype(np.float32)


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


COUNTER = CompileCounter()


class LogCompiles(logging.Handler):
    """Collects JAX's "Compiling ..." log lines while active (names what recompiled, if anything)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        if "ompil" in record.getMessage():
            self.messages.append(record.getMessage()[:300])

    def __enter__(self):
        self._previous = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", self._previous)


@pytest.mark.parametrize("steps", [1, 25])  # one step, and the default (several Euler steps)
def test_end_to_end_matches_diffusers(tiny_pipeline_dirs, jax_pipeline, image, latents, steps):
    """Same components, image and initial latents, noise_aug_strength 0, guidance 1 -> 3."""
    tpipe = tiny_pipeline_dirs[0]
    got = jax_pipeline(
        image,
        height=H,
        width=W,
        num_inference_steps=steps,
        noise_aug_strength=0.0,
        latents=latents,
        min_guidance_scale=1.0,
        max_guidance_scale=3.0,
    )
    want = tpipe(
        image,
        height=H,
        width=W,
        num_frames=F,
        num_inference_steps=steps,
        noise_aug_strength=0.0,
        min_guidance_scale=1.0,
        max_guidance_scale=3.0,
        output_type="np",
        latents=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy()),
    ).frames[0]
    assert got.shape == want.shape == (F, H, W, 3) and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= E2E_TOL
    assert float(want.std()) > 0.01  # frames are not a constant (the comparison means something)


def test_guidance_off_and_chunked_decode_match_diffusers(tiny_pipeline_dirs, jax_pipeline, image, latents):
    tpipe = tiny_pipeline_dirs[0]
    kw = dict(
        height=H,
        width=W,
        num_inference_steps=2,
        noise_aug_strength=0.0,
        max_guidance_scale=1.0,
        decode_chunk_size=2,
        fps=5,
        motion_bucket_id=40,
    )
    got = jax_pipeline(image, latents=latents, **kw)
    want = tpipe(
        image, num_frames=F, output_type="np", **kw, latents=torch.from_numpy(latents.transpose(0, 1, 4, 2, 3).copy())
    ).frames[0]
    assert float(np.abs(got - want).max()) <= E2E_TOL


def _conditioning(pipe, image):
    """(image_latents [1, F, h, w, 4], embeds [1, 1, D], ids [1, 3]) as the pipeline builds them."""
    from sfv_jax.diffusion import conditioning

    img = conditioning.load_image(image)
    embeds = pipe.encode_image(conditioning.clip_pixels(img, 224, pipe.clip_mean, pipe.clip_std)[None])[:, None]
    lat = pipe.encode_vae(conditioning.vae_pixels(img, H, W, 4)[None])
    return jnp.broadcast_to(lat[:, None], LATENT), embeds, jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32)


def test_sfv_one_step_is_the_denoiser_at_sigma_max_and_compiles_once(jax_pipeline, image):
    pipe = jax_pipeline
    image_latents, embeds, ids = _conditioning(pipe, image)
    sigmas = edm.sfv_sigmas(1)
    assert sigmas.tolist() == [700.0]
    noise = jax.random.normal(jax.random.PRNGKey(0), (1, *LATENT))
    got = pipe.sample_latents(noise, image_latents, embeds, ids, sigmas, sampler="sfv")

    # by hand: x_T = eps * sqrt(700^2 + 1); x0 = c_skip x_T + c_out F(c_in x_T; 0.25 ln 700)
    sigma = np.float32(700.0)
    x_t = np.asarray(noise[0]) * np.sqrt(sigma**2 + 1)
    sample = np.concatenate([x_t / np.sqrt(sigma**2 + 1), np.asarray(image_latents)], axis=-1)
    v = jax.jit(pipe.unet.apply)({"params": pipe.unet_params}, sample, np.float32(0.25 * np.log(sigma)), embeds, ids)
    want = x_t / (sigma**2 + 1) + np.asarray(v) * (-sigma / np.sqrt(sigma**2 + 1))
    assert rel_err(got, want) <= 1e-5

    # one compilation per shape: new noise values and a new seed compile nothing
    # one compilation per shape: a new frame count compiles; new seeds / noise values then compile nothing
    other_noise = np.asarray(noise) * 0.5
    before = COUNTER.count
    pipe(image, height=H, width=W, num_frames=F - 1, sampler="sfv", seed=1)
    mid = COUNTER.count
    with LogCompiles() as log:
        pipe(image, height=H, width=W, num_frames=F - 1, sampler="sfv", seed=2)
        pipe.sample_latents(other_noise, image_latents, embeds, ids, sigmas, sampler="sfv")
    assert COUNTER.count == mid, f"{COUNTER.count - mid} recompilations for unchanged shapes: {log.messages}"
    assert mid - before >= 2  # the counter does see compilations (the UNet and decoder stages for F - 1 frames)
    # another pipeline with equal modules (a generator trained from this teacher) runs the same executables
    # on its own parameters
    halved = jax.tree.map(lambda p: np.asarray(p) * 0.5, pipe.unet_params)  # numpy: compiles nothing
    other = dataclasses.replace(pipe, unet_params=halved, last_timings={}, _compiled={})
    with LogCompiles() as log:
        theirs = other.sample_latents(other_noise, image_latents, embeds, ids, sigmas, sampler="sfv")
    assert COUNTER.count == mid, f"equal modules recompiled: {log.messages}"
    assert other.compile_count == 1 and "compile" not in other.last_timings
    ours = pipe.sample_latents(other_noise, image_latents, embeds, ids, sigmas, sampler="sfv")
    assert np.abs(np.asarray(theirs) - np.asarray(ours)).max() > 1e-3


def test_generate_needs_one_seed_per_image(jax_pipeline, image):
    """(Batched generation's equality with single videos, sharded or not, is checked by the evaluation's
    smoke test: tests/test_evaluate.py.)"""
    with pytest.raises(ValueError, match="one seed per image"):
        jax_pipeline.generate([image, image], [1], GenerationSettings(height=H, width=W))


def test_sfv_few_steps_renoise_on_the_grid(jax_pipeline, image):
    pipe = jax_pipeline
    image_latents, embeds, ids = _conditioning(pipe, image)
    sigmas = edm.sfv_sigmas(3)
    np.testing.assert_allclose(sigmas, [700.0, 70.54, 2.269], rtol=2e-3)  # the T = 4 Karras grid (docs/method.md)
    noise = jax.random.normal(jax.random.PRNGKey(3), (3, *LATENT))
    got = pipe.sample_latents(noise, image_latents, embeds, ids, sigmas, sampler="sfv")

    velocity = pipeline.velocity_fn(pipe.unet, pipe.unet_params, image_latents, embeds, ids, None)
    denoise = jax.jit(lambda x, sigma: edm.denoise(velocity, x, sigma))
    x0 = denoise(noise[0] * edm.init_noise_sigma(700.0), sigmas[0])
    for i in (1, 2):
        x0 = denoise(x0 + sigmas[i] * noise[i], sigmas[i])
    assert rel_err(got, x0) <= 1e-5
    # with sfv_guidance the one step takes the teacher's per-frame guidance (the batch doubled), else none
    one = {"height": H, "width": W, "sampler": "sfv", "seed": 1}
    plain, guided = pipe(image, **one), pipe(image, **one, sfv_guidance=True)
    np.testing.assert_array_equal(pipe(image, **one, sfv_guidance=True, max_guidance_scale=1.0), plain)
    assert np.abs(guided - plain).max() > 1e-3
    scales = samplers.guidance_scales(1.0, 3.0, LATENT[1])
    one_noise = noise[:1]
    want = pipe.sample_latents(one_noise, image_latents, embeds, ids, sigmas[:1], sampler="sfv", scales=scales)
    guided_velocity = pipeline.velocity_fn(pipe.unet, pipe.unet_params, image_latents, embeds, ids, scales)
    x0 = jax.jit(lambda x: edm.denoise(guided_velocity, x, sigmas[0]))(one_noise[0] * edm.init_noise_sigma(700.0))
    assert rel_err(want, x0) <= 1e-5
    # only trained levels unless asked: 4 steps would denoise at sigma_min (docs/method.md, "Sampling")
    with pytest.raises(ValueError, match="1 to 3 steps.*never trained on"):
        edm.sfv_sigmas(4)
    np.testing.assert_allclose(edm.sfv_sigmas(4, untrained=True), [700.0, 70.54, 2.269, 0.002], rtol=2e-3)
    with pytest.raises(ValueError, match="1 to 4 steps"):
        edm.sfv_sigmas(5, untrained=True)
    with pytest.raises(ValueError, match="1 to 3 steps"):
        pipe(image, height=H, width=W, sampler="sfv", num_inference_steps=4)


def test_schedule_matches_diffusers_scheduler():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(presets.SVD_SCHEDULER)
    for n in (1, 4, 25):
        sched.set_timesteps(n)
        np.testing.assert_array_equal(edm.euler_sigmas(n), sched.sigmas.numpy())
        np.testing.assert_allclose(
            np.asarray(edm.c_noise(jnp.asarray(edm.euler_sigmas(n)[:-1]))), sched.timesteps.numpy(), rtol=1e-6
        )
    assert float(edm.init_noise_sigma(700.0)) == pytest.approx(float(sched.init_noise_sigma), rel=1e-7)
    g = samplers.guidance_scales(1.0, 3.0, 14)
    np.testing.assert_allclose(np.asarray(g), torch.linspace(1.0, 3.0, 14).numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_and_corrupt_images(jax_pipeline, tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        jax_pipeline(tmp_path / "nope.png", height=H, width=W, sampler="sfv")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="corrupt.png"):
        jax_pipeline(bad, height=H, width=W, sampler="sfv")


@pytest.mark.parametrize("height,width", [(50, 40), (48, 44), (0, 40)])
def test_sizes_the_vae_cannot_take(jax_pipeline, image, height, width):
    with pytest.raises(ImageError, match="multiple"):
        jax_pipeline(image, height=height, width=width, sampler="sfv")


def test_incompatible_frames_and_latents(jax_pipeline, image, latents):
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        jax_pipeline(image, height=H, width=W, num_frames=0, sampler="sfv")
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 3, 12, 10, 4\).*num_frames=3"):
        jax_pipeline(image, height=H, width=W, num_frames=3, latents=latents, sampler="sfv")
    with pytest.raises(ValueError, match="decode_chunk_size"):
        jax_pipeline(image, height=H, width=W, decode_chunk_size=0, sampler="sfv")
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        jax_pipeline(image, height=H, width=W, sampler="ddim")


def test_model_folder_missing_a_component(tiny_pipeline_dirs, tmp_path):
    for which in (1, 2):  # the diffusers folder and the converted one
        folder = tmp_path / f"copy{which}"
        shutil.copytree(tiny_pipeline_dirs[which], folder)
        shutil.rmtree(folder / "vae")
        with pytest.raises(CheckpointError, match=r"missing vae/"):
            pretrained.load_pipeline(folder, progress=False)
    with pytest.raises(CheckpointError, match="not an SVD pipeline folder"):
        pretrained.load_pipeline(tiny_pipeline_dirs[1] / "unet", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrained.load_pipeline(tmp_path / "absent", progress=False)
