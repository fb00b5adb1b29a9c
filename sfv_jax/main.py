"""SF-V training entry point: ``python -m sfv_jax.main --config configs/NAME.py --workdir DIR [--config.key=value]``.

Examples:
  python -m sfv_jax.main --config configs/tiny.py --workdir runs/tiny                       # CPU, minutes
  python -m sfv_jax.main --config configs/sfv_svd.py --workdir runs/sfv --config.init_from=checkpoints/svd
  python -m sfv_jax.main --config configs/tiny.py --workdir runs/tiny --config.total_steps=10 --config.seed=3
  python -m sfv_jax.main --config configs/sfv_svd.py --workdir runs/sfv --config.mesh.fsdp=4 --config.mesh.data=2
Multi-process (one process per host or GPU): set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, or launch with SLURM's srun (see launch/). Re-running with the same workdir resumes from its latest checkpoint. Set JAX_COMPILATION_CACHE_DIR to
reuse compiled steps across runs (it saves most of the start-up time of a restart).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and samples go here")
flags.mark_flags_as_required(["config", "workdir"])

_QUIET = ("/orbax/", "/jax/_src/", "/clu/local", "/clu/platform")  # their INFO lines drown the training log


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.addFilter(_QuietLibraries())
    from sfv_jax import sharding, train
    from sfv_jax.data.sources import DataConfigError
    from sfv_jax.safetensors_io import CheckpointError
    try:
        sharding.initialize_distributed()  # multi-process runs: before JAX touches a device
        train.train(FLAGS.config, FLAGS.workdir)
    except (train.ConfigError, DataConfigError, sharding.ShardingError, CheckpointError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ".")  # configs/ is importable from the repository root
    app.run(main)
