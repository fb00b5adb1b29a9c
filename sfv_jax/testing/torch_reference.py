"""The PyTorch reference (diffusers / transformers) side of parity tests, the demo and the benchmarks.

Its functions need the dev extras (``pip install -e ".[dev]"``: torch 2.13.0 CPU, diffusers, transformers),
imported when called; commands check first with :func:`sfv_jax.testing.require_dev_extras`. Nothing in
the library imports it. The model sizes are :mod:`sfv_jax.models.presets`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfv_jax.models import presets


def _unet_class():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel


def randomize_(module, seed: int = 0, scale: float = 0.1):
    """Perturb every parameter (norm scales, biases and mix factors too) so no weight is at its
    default: a port that ignored one would then fail parity."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("mix_factor"):
                p.copy_(noise)  # sigmoid anywhere in (0.1, 0.9): both branches matter
            elif p.ndim == 1:
                p.add_(scale * noise)
            else:
                p.add_(scale * noise * p.std().clamp(min=1e-3))
    return module


def build_unet(config: dict, seed: int = 0):
    """A diffusers UNet (fp32, eval mode) with randomised weights."""
    import torch

    torch.manual_seed(seed)
    model = _unet_class()(**{k: v for k, v in config.items() if not k.startswith("_")})
    return randomize_(model, seed).eval()


def meta_unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict key -> shape of the diffusers UNet, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = _unet_class()(**{k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_unet(model, folder: str | Path) -> Path:
    """Save as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def load_aligned(model_class, folder: str | Path):
    """``model_class.from_pretrained(folder)`` (fp32, eval) with every parameter and buffer copied into
    freshly allocated memory. safetensors tensors are read at their offsets in the file, so a loaded
    weight may start at any 4-byte boundary; PyTorch's CPU kernels then take other vectorisation paths
    and round differently (measured: 1.2e-6 on the tiny_b UNet's output with bit-identical weights,
    0.0 after the copy). Bit-exact comparisons of a reloaded model's outputs need this copy."""
    import torch

    model = model_class.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()
    return model


def unet_inputs(config: dict, batch: int, frames: int, height: int, width: int, seed: int = 0):
    """Deterministic channels-last inputs: (sample [B,F,H,W,C], timestep [B], context [B,1,D], ids [B,3])."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, frames, height, width, config["in_channels"]), dtype=np.float32)
    timestep = (0.25 * np.log(rng.uniform(0.002, 700.0, size=(batch,)))).astype(np.float32)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    context = rng.standard_normal((batch, 1, cross), dtype=np.float32)
    ids = np.stack([rng.uniform(3, 30, batch), rng.uniform(0, 255, batch), rng.uniform(0, 0.1, batch)], axis=1).astype(
        np.float32
    )
    return sample, timestep, context, ids


def unet_forward(model, sample, timestep, context, ids) -> np.ndarray:
    """Run the PyTorch UNet on channels-last numpy inputs; returns channels-last [B,F,H,W,C_out]."""
    import torch

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 1, 4, 2, 3))).to(device, dtype),
            torch.from_numpy(np.asarray(timestep)).to(device),
            torch.from_numpy(context).to(device, dtype),
            torch.from_numpy(ids).to(device, dtype),
            return_dict=False,
        )[0]
    return out.float().cpu().numpy().transpose(0, 1, 3, 4, 2)


# ----------------------------------------------------------------------------- VAE, image encoder, pipeline


def build_vae(config: dict = presets.VAES["tiny"], seed: int = 0):
    """A diffusers AutoencoderKLTemporalDecoder (fp32, eval) with randomised weights."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    model = AutoencoderKLTemporalDecoder(**{k: v for k, v in config.items() if not k.startswith("_")})
    return randomize_(model, seed).eval()


def build_image_encoder(config: dict = presets.IMAGE_ENCODERS["tiny"], seed: int = 0):
    """A transformers CLIPVisionModelWithProjection (fp32, eval, eager attention) with randomised weights."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = CLIPVisionModelWithProjection(cfg)
    return randomize_(model, seed).eval()


def build_pipeline(
    unet_config: dict = presets.UNETS["tiny_b"],
    vae_config: dict = presets.VAES["tiny"],
    clip_config: dict = presets.IMAGE_ENCODERS["tiny"],
    seed: int = 0,
):
    """A diffusers StableVideoDiffusionPipeline of tiny random components (fp32, CPU)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    scheduler = EulerDiscreteScheduler.from_config(presets.SVD_SCHEDULER)
    extractor = CLIPImageProcessor(
        crop_size={"height": clip_config["image_size"], "width": clip_config["image_size"]},
        size={"shortest_edge": clip_config["image_size"]},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        do_rescale=True,
        resample=3,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=build_vae(vae_config, seed),
        image_encoder=build_image_encoder(clip_config, seed),
        unet=build_unet(unet_config, seed),
        scheduler=scheduler,
        feature_extractor=extractor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    """Save as a diffusers SVD folder (model_index.json, unet/, vae/, image_encoder/, ...)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
