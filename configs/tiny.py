"""The SF-V pipeline at toy size, for a CPU: tiny random-init UNet / VAE / CLIP, synthetic videos
(16x16, 4 frames), 400 steps; the README's main job (about 4 minutes on a 2-core CPU: ~1.5 min of
compilation, then ~2.8 steps/s).

Run:
  python -m sfv_jax.main --config configs/tiny.py --workdir runs/tiny
Overrides: --config.total_steps=20 --config.seed=1 --config.init_from=path/to/converted_svd ...
"""

from __future__ import annotations

import ml_collections

from configs import sfv_svd


def get_config() -> ml_collections.ConfigDict:
    c = sfv_svd.get_config()
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.sample_every_steps = 200
    c.keep_checkpoints = 2
    c.init_from = None  # random init from the model configs below
    c.model.dtype = "float32"
    c.model.remat_policy = "none"  # nothing to save at this size; compiles faster
    c.model.attention_impl = None  # chunked on a CPU

    c.model.unet = {
        "_class_name": "UNetSpatioTemporalConditionModel", "in_channels": 8, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        "block_out_channels": [32, 64], "layers_per_block": 1, "num_attention_heads": [2, 4],
        "cross_attention_dim": 32, "transformer_layers_per_block": 1, "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 24, "num_frames": 4, "sample_size": 8}
    c.model.vae = {
        "_class_name": "AutoencoderKLTemporalDecoder", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "block_out_channels": [32, 32], "layers_per_block": 2,
        "latent_channels": 4, "sample_size": 16, "scaling_factor": 0.18215, "force_upcast": True}
    c.model.image_encoder = {
        "architectures": ["CLIPVisionModelWithProjection"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 32, "image_size": 224,
        "projection_dim": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-5}

    c.mesh.data, c.mesh.fsdp = -1, 1  # every device data parallel (one on a CPU)
    c.data.height, c.data.width, c.data.num_frames = 16, 16, 4
    c.data.micro_batch = 1
    c.data.accum_steps = 2
    c.data.workers = 2  # loader threads: a small CPU

    c.disc.channels = 32
    c.disc.proj_dim = 16
    c.sample.height, c.sample.width = 16, 16
    return c
