#!/usr/bin/env bash
# Recommended XLA / runtime settings for training on NVIDIA GPUs; `source launch/xla_flags.sh` before a run
# (the other launchers source it). Each flag is a documented XLA GPU option:
#   latency hiding scheduler      overlap FSDP all-gathers / reduce-scatters with compute
#   async collectives + combine   fewer, larger collectives (threshold in bytes)
#   command buffers off for       CUDA graphs of while-loops (the accumulation scan) have no gain and
#     conditionals/while          cost compile time
# XLA_PYTHON_CLIENT_MEM_FRACTION: the share of GPU memory JAX preallocates (0.95: leave room for NCCL).
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
  --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/sfv_jax_xla}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
