"""FVD evaluation, the paper's Table 1: ``sfv-evaluate --config eval_ucf101 --workdir DIR``
(``python -m sfv_jax.cli.evaluate``).

  sfv-evaluate --config eval_ucf101 --workdir runs/eval \\
      --config.eval.sfv_model=checkpoints/sfv --config.eval.teacher_model=checkpoints/svd \\
      --config.data.tfds_data_dir=/data/tfds
  ... --config.eval.num_videos=512 --config.eval.sfv_steps="(1,)" --config.eval.teacher_steps="(25, 16)"
  ... --config.data.kind=folder --config.data.path=data/ucf_eval   (built at 320x240, 7 fps)

The protocol, the rows and the cache: :mod:`sfv_jax.evaluation.runner`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from sfv_jax import console  # noqa: I001  (first: quietens TensorFlow before anything imports it)
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.data.sources import DataConfigError
from sfv_jax.evaluation.runner import EvalConfigError, evaluate
from sfv_jax.parallel import sharding
from sfv_jax.paths import OutputLock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "evaluation config: a name (eval_ucf101, eval_tiny) or a file", lock_config=True
)
flags.DEFINE_string("workdir", None, "reference statistics, generated videos, results and the table go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        return console.fail(f"unexpected arguments {argv[1:]}")
    try:
        sharding.initialize_distributed()
        with OutputLock(FLAGS.workdir, "--workdir", command="sfv-evaluate", part=sharding.lock_part()):
            evaluate(FLAGS.config, FLAGS.workdir)
    except (EvalConfigError, DataConfigError, CheckpointError, FileNotFoundError) as e:
        return console.fail(e)
    return 0


def run() -> None:
    """The ``sfv-evaluate`` console script."""
    console.run_absl(main)


if __name__ == "__main__":
    run()
