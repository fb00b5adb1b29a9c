"""The PyTorch reference (diffusers) side of parity checks, demos and benchmarks.

Needs the test-only dependencies (``requirements-test.txt``: torch, diffusers). Nothing here is
imported by the library proper. Tiny configs keep every check on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Two tiny SVD-shaped UNets that differ in depth, frames, heads, layers per block and transformer
# depth. TINY_B's latent size (see TINY_SHAPES) is not a multiple of 4, so it exercises diffusers'
# forwarded upsample sizes.
TINY_A: dict[str, Any] = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "num_attention_heads": [2, 4],
    "cross_attention_dim": 32, "transformer_layers_per_block": 1,
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24, "num_frames": 3,
    "sample_size": 8,
}
TINY_B: dict[str, Any] = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                         "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                       "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64, 96], "layers_per_block": 2, "num_attention_heads": [1, 2, 3],
    "cross_attention_dim": 48, "transformer_layers_per_block": [1, 2, 1],
    "addition_time_embed_dim": 16, "projection_class_embeddings_input_dim": 48, "num_frames": 5,
    "sample_size": 12,
}
# config name -> (batch, frames, latent height, latent width)
TINY_SHAPES = {"tiny_a": (2, 3, 8, 8), "tiny_b": (1, 5, 12, 10)}
TINY_CONFIGS = {"tiny_a": TINY_A, "tiny_b": TINY_B}

# The published stabilityai/stable-video-diffusion-img2vid unet/config.json.
SVD_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8, "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 14,
    "out_channels": 4, "projection_class_embeddings_input_dim": 768, "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}


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


def unet_inputs(config: dict, batch: int, frames: int, height: int, width: int, seed: int = 0):
    """Deterministic channels-last inputs: (sample [B,F,H,W,C], timestep [B], context [B,1,D], ids [B,3])."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, frames, height, width, config["in_channels"]), dtype=np.float32)
    timestep = (0.25 * np.log(rng.uniform(0.002, 700.0, size=(batch,)))).astype(np.float32)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    context = rng.standard_normal((batch, 1, cross), dtype=np.float32)
    ids = np.stack([rng.uniform(3, 30, batch), rng.uniform(0, 255, batch), rng.uniform(0, 0.1, batch)],
                   axis=1).astype(np.float32)
    return sample, timestep, context, ids


def unet_forward(model, sample, timestep, context, ids) -> np.ndarray:
    """Run the PyTorch UNet on channels-last numpy inputs; returns channels-last [B,F,H,W,C_out]."""
    import torch

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 1, 4, 2, 3))).to(device, dtype),
                    torch.from_numpy(np.asarray(timestep)).to(device),
                    torch.from_numpy(context).to(device, dtype),
                    torch.from_numpy(ids).to(device, dtype), return_dict=False)[0]
    return out.float().cpu().numpy().transpose(0, 1, 3, 4, 2)


# ----------------------------------------------------------------------------- VAE, image encoder, pipeline

# A tiny AutoencoderKLTemporalDecoder: 3 levels, so images are 4x the latent size.
TINY_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKLTemporalDecoder", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "block_out_channels": [32, 32, 64], "layers_per_block": 2,
    "latent_channels": 4, "sample_size": 32, "scaling_factor": 0.18215, "force_upcast": True,
}
# A tiny CLIPVisionModelWithProjection (projection_dim = TINY_B's cross_attention_dim). The image size stays
# 224: diffusers' SVD pipeline always resizes the CLIP input to 224x224; 32-pixel patches keep it cheap.
TINY_CLIP: dict[str, Any] = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
    "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "patch_size": 32, "image_size": 224, "num_channels": 3, "projection_dim": 48, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# stabilityai/stable-video-diffusion-img2vid scheduler/scheduler_config.json.
SVD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous", "trained_betas": None,
    "use_karras_sigmas": True,
}


def build_vae(config: dict = TINY_VAE, seed: int = 0):
    """A diffusers AutoencoderKLTemporalDecoder (fp32, eval) with randomised weights."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    model = AutoencoderKLTemporalDecoder(**{k: v for k, v in config.items() if not k.startswith("_")})
    return randomize_(model, seed).eval()


def build_image_encoder(config: dict = TINY_CLIP, seed: int = 0):
    """A transformers CLIPVisionModelWithProjection (fp32, eval, eager attention) with randomised weights."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = CLIPVisionModelWithProjection(cfg)
    return randomize_(model, seed).eval()


def build_pipeline(unet_config: dict = TINY_B, vae_config: dict = TINY_VAE, clip_config: dict = TINY_CLIP,
                   seed: int = 0):
    """A diffusers StableVideoDiffusionPipeline of tiny random components (fp32, CPU)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    extractor = CLIPImageProcessor(crop_size={"height": clip_config["image_size"], "width": clip_config["image_size"]},
                                   size={"shortest_edge": clip_config["image_size"]}, do_center_crop=True,
                                   do_normalize=True, do_resize=True, do_rescale=True, resample=3)
    pipe = StableVideoDiffusionPipeline(vae=build_vae(vae_config, seed), image_encoder=build_image_encoder(clip_config, seed),
                                        unet=build_unet(unet_config, seed), scheduler=scheduler,
                                        feature_extractor=extractor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    """Save as a diffusers SVD folder (model_index.json, unet/, vae/, image_encoder/, ...)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
