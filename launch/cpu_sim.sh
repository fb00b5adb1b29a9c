#!/usr/bin/env bash
# The multi-device and multi-host code paths on a laptop: 8 virtual CPU devices.
#   bash launch/cpu_sim.sh                 one process, 8 devices, mesh data=2 x fsdp=4 (tiny config)
#   bash launch/cpu_sim.sh --processes 2   two processes x 4 devices joined by jax.distributed on localhost
# Extra arguments go to sfv_jax.cli.train. Workdir: runs/cpu_sim (a second run resumes it; delete it to restart).
set -euo pipefail
cd "$(dirname "$0")/.."
procs=1
if [ "${1:-}" = "--processes" ]; then procs=$2; shift 2; fi
if (( 8 % procs )); then echo "--processes must divide 8" >&2; exit 2; fi
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$((8 / procs))"
args=(--config configs/tiny.py --workdir runs/cpu_sim --config.mesh.data=2 --config.mesh.fsdp=4
      --config.sharding.min_shard_size=1024 --config.total_steps=20 "$@")
if (( procs == 1 )); then exec .venv/bin/python -m sfv_jax.cli.train "${args[@]}"; fi
export JAX_COORDINATOR_ADDRESS=localhost:${PORT:-12321} JAX_NUM_PROCESSES=$procs
pids=()
for ((i = 0; i < procs; i++)); do
  JAX_PROCESS_ID=$i .venv/bin/python -m sfv_jax.cli.train "${args[@]}" > "runs/cpu_sim.process$i.log" 2>&1 &
  pids+=($!)
done
echo "[cpu_sim] $procs processes; logs: runs/cpu_sim.process*.log"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 runs/cpu_sim.process0.log
exit $status
