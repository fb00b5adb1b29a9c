#!/usr/bin/env bash
# One machine, all its GPUs, one process (JAX drives every local GPU from one process).
#   bash launch/single_node.sh configs/sfv_svd.py runs/sfv_svd --config.init_from=checkpoints/svd
# Extra arguments are passed to sfv_jax.cli.train (e.g. --config.mesh.data=2 --config.mesh.fsdp=4).
# Check the memory first: python -m sfv_jax.cli.memory --config configs/sfv_svd.py --mesh fsdp=8
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2; fi
config=$1 workdir=$2; shift 2
source launch/xla_flags.sh
exec .venv/bin/python -m sfv_jax.cli.train --config "$config" --workdir "$workdir" "$@"
