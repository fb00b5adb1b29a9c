"""Training: ``sfv-train --config NAME|PATH --workdir DIR [--config.key=value ...]``
(``python -m sfv_jax.cli.train`` is the same command).

Examples:
  sfv-train --config tiny --workdir runs/tiny                                    # CPU, minutes
  sfv-train --config sfv_svd --workdir runs/sfv --config.init_from=checkpoints/svd
  sfv-train --config tiny --workdir runs/tiny --config.total_steps=10 --config.seed=3
  sfv-train --config sfv_svd --workdir runs/sfv --config.mesh.fsdp=4 --config.mesh.data=2
  sfv-train --config configs/tiny.py --workdir runs/tiny --verbose_tables   # + per-parameter tables in the log
Multi-process (one process per host or GPU): set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, or launch with SLURM's srun (see launch/). Re-running with the same workdir resumes from its
latest checkpoint. Set JAX_COMPILATION_CACHE_DIR to reuse compiled steps across runs (it saves most of the
start-up time of a restart).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sfv_jax import console  # noqa: I001  (first: quietens TensorFlow before anything imports it)
from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.data.sources import DataConfigError
from sfv_jax.parallel import sharding
from sfv_jax.training import trainer
from sfv_jax.training.run_config import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, f"training config: a name ({', '.join(console.configs.NAMES)}) or a config file", lock_config=True
)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and samples go here")
flags.DEFINE_bool("verbose_tables", False, "also log the per-parameter tables (always in WORKDIR/parameters.txt)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sharding.initialize_distributed()  # multi-process runs: before JAX touches a device
        trainer.train(FLAGS.config, FLAGS.workdir, verbose_tables=FLAGS.verbose_tables)
    except (ConfigError, DataConfigError, sharding.ShardingError, CheckpointError, FloatingPointError) as e:
        return console.fail(e)
    return 0


def run() -> None:
    """The ``sfv-train`` console script."""
    console.run_absl(main)


if __name__ == "__main__":
    run()
