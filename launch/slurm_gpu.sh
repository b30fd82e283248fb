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
# Whether this is a task of a job step (srun, e.g. inside an allocation): SLURM_STEP_ID is a
# step number there; unset, or one of Slurm's reserved ids (>= 0xfffffffa: the batch script,
# an interactive or extern step) elsewhere.
in_step() {
  [[ "${SLURM_STEP_ID:-}" =~ ^[0-9]+$ ]] && (( SLURM_STEP_ID < 4294967290 ))
}
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
  # (awk reads every line: `head -n 1` exits early and, with pipefail, a long node list's
  # SIGPIPE to scontrol would stop this script with status 141)
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
  dist+=(--config.distributed.coordinator_address="$head:${PORT:-12345}"
         --config.distributed.num_processes="${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}}"
         --config.distributed.process_id="${SLURM_PROCID:-0}")
fi
cmd=("$PYTHON" -m "$module" "$@" "${dist[@]}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${DISTILL_SRUN:-}" ] && ! in_step; then
  # The batch script itself: start one task per node (srun passes the environment on). sbatch
  # runs a copy of this file from the first node's spool directory, which the other nodes do
  # not have: the tasks run the checkout's own copy.
  script="$REPO/launch/slurm_gpu.sh"
  [ -f "$script" ] || { echo "error: $script does not exist: set REPO to this checkout's path" \
                             "on the nodes (sbatch from the checkout's root sets it)" >&2; exit 2; }
  DISTILL_SRUN=1 exec srun --ntasks-per-node=1 bash "$script" "$module" "$@"
else
  cd "$REPO" && exec "${cmd[@]}"
fi
