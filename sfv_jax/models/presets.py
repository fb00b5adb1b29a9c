"""Architecture presets: the one home of every model size the project names, as diffusers / transformers
config dicts (what ``config.json`` holds and ``models.build.*_from_config`` reads).

  tiny_a, tiny_b   two tiny SVD-shaped UNets for parity tests (they differ in depth, frames, heads,
                   layers per block and transformer depth; tiny_b's latent size is not a multiple of 4,
                   which exercises diffusers' forwarded upsample sizes)
  tiny             the parity pipeline: tiny_b + a 3-level VAE + a 2-layer ViT (CPU seconds)
  toy              the toy training world of ``configs/tiny.py`` (16x16 frames, 4 of them)
  small            SVD's structure at about a fifth of its width (CPU benchmarks: kernels, not
                   dispatch, dominate)
  svd              stabilityai/stable-video-diffusion-img2vid (14 frames)
  svd_xt           stable-video-diffusion-img2vid-xt (25 frames; the same VAE and image encoder)

The ``*Config`` dataclasses' defaults are SVD's; ``tests/test_model_options.py`` checks they equal the
``svd`` presets.
"""

from __future__ import annotations

from typing import Any

_SVD_UNET: dict[str, Any] = {  # the published unet/config.json
    "_class_name": "UNetSpatioTemporalConditionModel",
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8,
    "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 14,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 768,
    "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}
_TINY_A: dict[str, Any] = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "num_attention_heads": [2, 4],
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "num_frames": 3,
    "sample_size": 8,
}
UNETS: dict[str, dict[str, Any]] = {
    "tiny_a": _TINY_A,
    "tiny_b": {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": [
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ],
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        "block_out_channels": [32, 64, 96],
        "layers_per_block": 2,
        "num_attention_heads": [1, 2, 3],
        "cross_attention_dim": 48,
        "transformer_layers_per_block": [1, 2, 1],
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 48,
        "num_frames": 5,
        "sample_size": 12,
    },
    "toy": {**_TINY_A, "num_frames": 4},
    # the toy world's teacher (cli/toy_world.py, configs/toy_teacher.py): 8x8x4 latents, 14 frames. 32 / 64
    # channels: 64 / 96 trains 5x slower on a 2-core CPU (fwd + bwd of 8 clips: 2.66 s against 0.52 s)
    "toy32": {**_TINY_A, "num_frames": 14},
    "small": {
        **_SVD_UNET,
        "block_out_channels": [64, 128, 256, 256],
        "num_attention_heads": [2, 4, 8, 8],
        "cross_attention_dim": 256,
        "addition_time_embed_dim": 64,
        "projection_class_embeddings_input_dim": 192,
    },
    "svd": _SVD_UNET,
    "svd_xt": {**_SVD_UNET, "num_frames": 25},
}
# parity UNet -> its test input shape (batch, frames, latent height, latent width)
UNET_TEST_SHAPES = {"tiny_a": (2, 3, 8, 8), "tiny_b": (1, 5, 12, 10)}

_TINY_VAE: dict[str, Any] = {  # 3 levels: images are 4x the latent size
    "_class_name": "AutoencoderKLTemporalDecoder",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
VAES: dict[str, dict[str, Any]] = {
    "tiny": _TINY_VAE,
    "toy": {
        **_TINY_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "block_out_channels": [32, 32],
        "sample_size": 16,
    },
    # the toy world's VAE (cli/toy_world.py): 32x32 frames -> 8x8 latents. SVD's VAE normalises with 32
    # GroupNorm groups (fixed in diffusers); at 32 channels each group is one channel, and the final norms
    # (encoder: last level, decoder: first level) then remove every channel's mean: the colours are lost
    # (measured: grey reconstructions, 20.3 dB held-out PSNR with [32, 32, 64]). >= 64 channels everywhere.
    "toy32": {**_TINY_VAE, "block_out_channels": [64, 64, 128], "sample_size": 32},
    "small": {**_TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * 4, "block_out_channels": [32, 64, 128, 128]},
    "svd": {
        **_TINY_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "sample_size": 768,
    },
}
VAES["svd_xt"] = VAES["svd"]

# The image size stays 224: diffusers' SVD pipeline always resizes the CLIP input to 224x224; 32-pixel
# patches keep the tiny ones cheap. tiny's projection_dim = tiny_b's cross_attention_dim.
_TINY_CLIP: dict[str, Any] = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 32,
    "image_size": 224,
    "num_channels": 3,
    "projection_dim": 48,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
IMAGE_ENCODERS: dict[str, dict[str, Any]] = {
    "tiny": _TINY_CLIP,
    "toy": {
        **_TINY_CLIP,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
    "small": {
        **_TINY_CLIP,
        "hidden_size": 320,
        "intermediate_size": 1280,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "patch_size": 14,
        "projection_dim": 256,
    },
    "svd": {
        **_TINY_CLIP,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "projection_dim": 1024,
    },
}
IMAGE_ENCODERS["svd_xt"] = IMAGE_ENCODERS["svd"]

# whole pipelines: (unet, vae, image encoder)
PIPELINES: dict[str, tuple[dict, dict, dict]] = {
    name: (UNETS["tiny_b" if name == "tiny" else name], VAES[name], IMAGE_ENCODERS[name])
    for name in ("tiny", "toy", "small", "svd", "svd_xt")
}

# stabilityai/stable-video-diffusion-img2vid scheduler/scheduler_config.json (what the teacher sampler follows)
SVD_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}
