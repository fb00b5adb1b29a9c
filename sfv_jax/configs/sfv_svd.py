"""The paper's SF-V setting (Sec. 4): full SVD, 768x448, 14 frames at 7 FPS, total batch 32 =
8 devices x micro-batch 1 x 4 accumulation steps, 50K iterations, SM3 (momentum 0.5, beta2 0.999;
lr 1e-5 generator, 1e-4 discriminator), EMA 0.95, lambda 0.1, P_mean = P_std = -1, T_g = 4, T_d = 1000.

Run (init_from: the converted SVD folder, ``python -m sfv_jax.cli.convert --src stable-video-diffusion-img2vid
--out checkpoints/svd``):
  python -m sfv_jax.cli.train --config configs/sfv_svd.py --workdir runs/sfv_svd --config.init_from=checkpoints/svd
Samples per step: micro_batch x batch shards (devices along mesh data x fsdp) x accum_steps = 1 x 8 x 4.
Multi-GPU / multi-node launchers: launch/ (docs/scaling.md). Memory check first,
compiled by the GPU's own compiler on any host (docs/targets.md):
  python -m sfv_jax.cli.memory --config configs/sfv_svd.py --mesh fsdp=8 --target h100
      -> peak 10.64 GB per device (the generator's gradient step; measured 2026-12-06, 19 min on 2 cores)
Data: the embedded synthetic videos by default. Real videos:
  python -m sfv_jax.cli.build_dataset --videos DIR --out data/clips --fps 7 --height 448 --width 768
  ... --config.data.kind=folder --config.data.path=data/clips
  python -m sfv_jax.cli.encode_dataset --config configs/sfv_svd.py --config.init_from=checkpoints/svd \
      --config.data.kind=folder --config.data.path=data/clips --out data/clips_latents
  ... --config.data.kind=latents --config.data.path=data/clips_latents
  ... --config.data.kind=ucf101 --config.data.tfds_data_dir=DIR   (TFDS ucf101 prepared as array_record)
"""

from __future__ import annotations

import ml_collections

from sfv_jax.diffusion.generation import GenerationSettings
from sfv_jax.parallel import sharding


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 50_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # a rerun whose latest checkpoint cannot be read moves it to WORKDIR/unreadable_checkpoints/ and resumes
    # from the newest readable one (False: stop with an error naming it)
    c.checkpoint_fallback = True
    c.sample_every_steps = 2000
    # SF-V: the discriminator's margin and pair rank per generator level on fixed clips (training.heldout); 0: off
    c.heldout_every_steps = 0
    c.heldout_steps = 1  # its fixed clips: this many training steps' worth of samples (more: a finer pair rank)
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # converted or diffusers SVD folder
    # "sfv": SF-V (generator + discriminator); "diffusion": SVD's own denoising loss (configs/svd_finetune.py)
    c.objective = "sfv"
    c.trainable = "all"  # "all" | "temporal" (only the UNet's temporal layers; sfv_jax.training.param_groups)

    # 8 GPUs: every device one FSDP shard (parameters, EMA, optimizer states split 8 ways), batch split 8 ways
    c.mesh = sharding.mesh_config(data=1, fsdp=-1, tensor=1)
    c.sharding = sharding.sharding_config()  # logical-axis rules, min_shard_size, fsdp_fallback

    c.model = ml_collections.ConfigDict()
    c.model.unet = None  # random-init configs (used only without init_from)
    c.model.vae = None
    c.model.image_encoder = None
    c.model.dtype = "bfloat16"  # compute; parameters and optimizer states stay float32
    c.model.remat_policy = "full"
    # cuDNN flash attention (NVIDIA GPUs, bf16): O(tokens) memory at 768x448 (5376 tokens per frame). A
    # preference: calls cuDNN cannot compile (the one-key cross-attention) and other platforms take an exact
    # portable kernel (models.attention.attention_kernel); None = chunked on a CPU / XLA's plain attention elsewhere
    c.model.attention_impl = "cudnn"

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # "synthetic" | "folder" | "latents" | "ucf101" (sfv_jax.data.sources)
    c.data.synthetic_detail = 1.0  # kind=synthetic: the background gratings' frequency scale (toy world: 0.35)
    # kind=synthetic: each clip's mean colour per channel, in [0, 1] (None: as drawn; toy world: 0.4)
    c.data.synthetic_mean_colour = ml_collections.FieldReference(None, field_type=float)
    c.data.path = ml_collections.FieldReference(None, field_type=str)  # folder / latents dataset folder
    c.data.split = "train"
    c.data.tfds_name = "ucf101"  # kind=ucf101: any TFDS video dataset with a "video" feature works
    c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.source_fps = 25.0  # kind=ucf101: the frame rate of the TFDS videos (UCF-101: 25)
    c.data.workers = 8  # loader threads (decode + resize + encode), per process
    c.data.prefetch = 2  # steps loaded ahead
    c.data.height, c.data.width, c.data.num_frames = 448, 768, 14
    c.data.fps = 7
    c.data.motion_bucket_id = 127  # or -1: from the clip's motion score
    c.data.noise_aug = "fixed"  # conditioning-frame noise augmentation: "fixed" | "lognormal" (per sample)
    c.data.noise_aug_strength = 0.02  # fixed; also the strength of the periodic samples
    c.data.noise_aug_log_mean = -3.0  # lognormal: ln strength ~ N(-3.0, 0.5^2), as SVD fine-tuning draws it
    c.data.noise_aug_log_std = 0.5
    c.data.micro_batch = 1  # per device (batch shard) and accumulation step
    c.data.accum_steps = 4

    c.disc = ml_collections.ConfigDict()
    c.disc.heads = "both"  # "both" | "spatial" | "temporal" (paper Tab. 2 ablation)
    c.disc.channels = 128
    c.disc.proj_dim = 64
    c.disc.groups = 32  # GroupNorm groups in the head bodies (4 channels each at 128 channels)
    # sigma' / frame-index sinusoids: "paper" (c_noise itself: nearly constant over sigma') | "spread" ([0, 1000])
    c.disc.cond_embedding = "paper"
    c.disc.spectral_norm = False  # the head bodies' convs spectrally normalised (StyleGAN-T's heads; paper: not said)
    # the backbone maps the heads see: "blocks" (each down block's output, the paper's) | "conv_in+blocks"
    c.disc.feature_maps = "blocks"

    # the diffusion objective (objective="diffusion"): sigma ~ lognormal(p_mean, p_std), EDM weighting,
    # conditioning dropout for classifier-free guidance (the embedding alone, both, the latent alone)
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.p_mean = 0.7
    c.diffusion.p_std = 1.6
    c.diffusion.drop_embed = 0.05
    c.diffusion.drop_both = 0.05
    c.diffusion.drop_latent = 0.05

    c.loss = ml_collections.ConfigDict()
    c.loss.recon_weight = 0.1
    c.loss.adv_weight = 1.0  # the adversarial term's weight (0: the reconstruction-only ablation)
    c.loss.huber_c = ml_collections.FieldReference(None, field_type=float)  # None: 0.00054 sqrt(d)
    c.loss.generator_grid = 4
    # P[sigma_g = sigma_max], the level the one-step sampler uses; None: uniform over the T_g - 1 levels (paper)
    c.loss.sigma_max_prob = ml_collections.FieldReference(None, field_type=float)
    c.loss.discriminator_levels = 1000
    c.loss.p_mean = -1.0
    c.loss.p_std = -1.0
    c.loss.r1_type = "features"  # "none" | "paper" | "features" | "approx"
    c.loss.r1_gamma = 1e-5
    c.loss.r1_alpha = 0.1
    # log g_adv_out_grad / g_recon_out_grad: each generator term's gradient norm at x0_hat (one more
    # discriminator backward pass per micro-batch)
    c.loss.grad_balance = False
    # beyond the paper: adversarial diffusion distillation's teacher term (ADD, Sauer et al. 2023), the
    # generator's output renoised at the teacher's training levels (diffusion.p_mean / p_std) and pulled towards
    # the frozen teacher's guided denoising of it; its weight (0: off, the paper) and the teacher's per-frame
    # guidance (the teacher sampler's defaults). On, the run keeps the whole teacher UNet frozen, not only its
    # encoder, and each generator step runs it once on a doubled batch
    c.loss.distill_weight = 0.0
    c.loss.distill_min_guidance = GenerationSettings.min_guidance_scale
    c.loss.distill_max_guidance = GenerationSettings.max_guidance_scale

    c.opt = ml_collections.ConfigDict()
    # None: the objective's default (sfv: "sm3", the paper's; diffusion: "adamw"); or "sm3" | "adamw"
    c.opt.optimizer = ml_collections.FieldReference(None, field_type=str)
    c.opt.generator_lr = 1e-5
    c.opt.discriminator_lr = 1e-4
    c.opt.b1 = 0.5  # SM3
    c.opt.b2 = 0.999
    c.opt.adamw_b1 = 0.9
    c.opt.adamw_b2 = 0.999
    c.opt.adamw_eps = 1e-8
    c.opt.weight_decay = 1e-2  # AdamW
    c.opt.warmup_steps = 0  # linear learning-rate warm-up (both optimizers)
    c.opt.clip_norm = ml_collections.FieldReference(None, field_type=float)  # global-norm clipping; None: off
    c.opt.ema_rate = 0.95
    c.opt.disc_updates = 1  # discriminator updates per generator update, each on the same batch with fresh noise
    c.opt.nonfinite = "skip"  # "skip" | "halt"
    c.opt.halt_check = "log_steps"  # when the host reads the finite flags: "log_steps" | "every_step"

    c.sample = ml_collections.ConfigDict()
    c.sample.height, c.sample.width = 576, 1024
    c.sample.steps = 1  # sfv: the SF-V sampler's steps; diffusion: the teacher's Euler steps
    c.sample.min_guidance_scale, c.sample.max_guidance_scale = 1.0, 3.0  # diffusion: the teacher's per-frame guidance
    c.sample.sfv_guidance = False  # sfv: True samples the generator with that guidance too (not the paper's)
    return c
