"""FVD evaluation with the paper's protocol (Sec. 4.2, Tab. 1): UCF-101 first frames as conditioning,
14 frames at 1024x576 and 7 fps, resized to 320x240, FVD (I3D) over 2048 videos against the real clips;
SF-V at 1-4 steps (the 4th on the untrained sigma_min, as the paper: sampler "sfv_grid") and the SVD
teacher at 25 / 16 / 8 / 4 steps (guidance 1 -> 3).

Run (the SF-V export of a training run and the converted SVD; UCF-101 prepared once with
`tfds build ucf101 --file_format=array_record --data_dir /data/tfds`):
  python -m sfv_jax.cli.evaluate --config configs/eval_ucf101.py --workdir runs/eval_ucf101 \\
      --config.eval.sfv_model=checkpoints/sfv --config.eval.teacher_model=checkpoints/svd \\
      --config.data.tfds_data_dir=/data/tfds
From a folder of UCF-101 videos instead of TFDS (build at the FVD size and frame rate):
  python -m sfv_jax.cli.build_dataset --videos UCF-101/ --out data/ucf101_eval --fps 7 --height 240 --width 320
  ... --config.data.kind=folder --config.data.path=data/ucf101_eval
Fewer rows / videos: --config.eval.sfv_steps="(1,)" --config.eval.teacher_steps="(25,)" --config.eval.num_videos=512
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # the real videos: their first frames condition the generation; their first 14 frames at 7 fps are the
    # real clips. height x width is the size every video is compared at (UCF-101's native 320x240)
    c.data = ml_collections.ConfigDict()
    c.data.kind = "ucf101"  # "ucf101" (TFDS) | "folder" (python -m sfv_jax.cli.build_dataset)
    c.data.path = ml_collections.FieldReference(None, field_type=str)
    c.data.split = "test"
    c.data.tfds_name = "ucf101"
    c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.source_fps = 25.0
    c.data.fps = 7
    c.data.num_frames = 14
    c.data.height, c.data.width = 240, 320
    c.data.workers = 8  # threads reading the reference videos

    c.eval = ml_collections.ConfigDict()
    c.eval.num_videos = 2048
    c.eval.seed = 0  # video i: reference video i of the seeded selection, noise seed seed + i
    c.eval.sfv_model = ml_collections.FieldReference(None, field_type=str)  # python -m sfv_jax.cli.export output
    c.eval.sfv_steps = (1, 2, 3, 4)
    c.eval.teacher_model = ml_collections.FieldReference(None, field_type=str)  # SVD folder (diffusers/converted)
    c.eval.teacher_steps = (25, 16, 8, 4)
    c.eval.min_guidance_scale, c.eval.max_guidance_scale = 1.0, 3.0  # the teacher's per-frame guidance (SF-V: none)
    c.eval.sfv_guidance = False  # True: the SF-V rows take that guidance too (not the paper's; 2 UNet evaluations)
    c.eval.height, c.eval.width = 576, 1024
    c.eval.motion_bucket_id = 127
    c.eval.noise_aug_strength = 0.02
    c.eval.decode_chunk_size = ml_collections.FieldReference(None, field_type=int)  # frames per VAE decode call
    c.eval.dtype = "bfloat16"
    c.eval.batch_size = 1  # videos per device per generation call
    c.eval.chunk_size = 16  # videos per cache file (the unit of resuming)
    c.eval.i3d_batch_size = 8  # videos per device per I3D call
    c.eval.latency_repeats = 5
    c.eval.keep_videos = True  # store the 320x240 uint8 videos with their features (3.2 MB each)
    return c
