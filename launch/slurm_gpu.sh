#!/usr/bin/env bash
# Runs one launch command on a SLURM GPU allocation: one process per node, each driving all of
# its node's GPUs; jax.distributed reads the coordinator address, process count and process id
# from SLURM's environment (or from COORDINATOR / NUM_PROCESSES / PROCESS_ID when given).
#
#     sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh launch.train \
#         --config configs/toy/scm.py --workdir /shared/runs/scm [--config.a.b=v ...]
#     # or inside an allocation: srun --ntasks-per-node=1 bash launch/slurm_gpu.sh launch.train ...
#
# Environment: PYTHON (default python3), REPO (default: this checkout), PORT (coordinator port,
# default 12345). DRY_RUN=1 prints the command a node would run. The run directory must be on a
# file system every node sees.
#SBATCH --job-name=distill
#SBATCH --ntasks-per-node=1
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch [options] $0 launch.<command> [args...]" >&2; exit 2; }
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-python3}
module=$1
shift
dist=(--config.distributed.initialize=true)
if [ -n "${COORDINATOR:-}" ]; then
  dist+=(--config.distributed.coordinator_address="$COORDINATOR"
         --config.distributed.num_processes="${NUM_PROCESSES:?}"
         --config.distributed.process_id="${PROCESS_ID:?}")
elif [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol > /dev/null; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  dist+=(--config.distributed.coordinator_address="$head:${PORT:-12345}"
         --config.distributed.num_processes="${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}}"
         --config.distributed.process_id="${SLURM_PROCID:-0}")
fi
cmd=("$PYTHON" -m "$module" "$@" "${dist[@]}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${DISTILL_SRUN:-}" ]; then
  # The batch script itself: start one task per node (srun passes the environment on).
  DISTILL_SRUN=1 exec srun --ntasks-per-node=1 bash "$0" "$module" "$@"
else
  cd "$REPO" && exec "${cmd[@]}"
fi
