"""FVD evaluation at toy size, for a CPU smoke run: a folder dataset built at 16x16 and 7 fps, 8 videos of 9
frames (I3D's minimum) generated at 32x32 by a tiny model; SF-V at 1 and 2 steps, the teacher at 2 steps.
The numbers mean nothing (8 videos, random weights); the run exercises every stage of the real protocol.

Run (a tiny model: e.g. `python -m sfv_jax.cli.train --config configs/tiny.py --workdir runs/tiny` then
`python -m sfv_jax.cli.export --workdir runs/tiny --out runs/tiny/export`):
  python -m sfv_jax.cli.build_dataset --videos my_videos/ --out data/tiny_eval --fps 7 --height 16 --width 16
  python -m sfv_jax.cli.evaluate --config configs/eval_tiny.py --workdir runs/eval_tiny \\
      --config.data.path=data/tiny_eval --config.eval.sfv_model=runs/tiny/export \\
      --config.eval.teacher_model=runs/tiny/export
"""

from __future__ import annotations

import ml_collections

from sfv_jax.configs import eval_ucf101


def get_config() -> ml_collections.ConfigDict:
    c = eval_ucf101.get_config()
    c.data.kind = "folder"
    c.data.split = "train"  # a folder dataset has one split
    c.data.num_frames = 9
    c.data.height, c.data.width = 16, 16
    c.data.workers = 2
    c.eval.num_videos = 8
    c.eval.sfv_steps = (1, 2)
    c.eval.teacher_steps = (2,)
    c.eval.height, c.eval.width = 32, 32
    c.eval.dtype = "float32"
    c.eval.batch_size = 2
    c.eval.chunk_size = 4
    c.eval.i3d_batch_size = 4
    c.eval.latency_repeats = 1
    return c
