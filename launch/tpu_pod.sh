#!/usr/bin/env bash
# Runs one launch command on every worker of a Cloud TPU VM pod slice (one process per host;
# jax.distributed discovers the pod itself on TPU VMs).
#
#     TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh launch.train \
#         --config configs/toy/scm.py --workdir gs://bucket/runs/scm [--config.a.b=v ...]
#
# Environment: TPU (the TPU VM name), ZONE, PROJECT (optional), REPO (the checkout's path on the
# workers, default: this checkout's absolute path; the code must be there on every worker, e.g.
# a shared disk or `gcloud ... scp`), PYTHON (default python3), SETUP (a command run first on
# every worker, e.g. "pip install -e .[tpu]"). DRY_RUN=1 prints the gcloud command instead.
# The run directory must be reachable by every host (GCS or a shared file system): Orbax writes
# one checkpoint from all processes.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: TPU=... ZONE=... $0 launch.<command> [args...]" >&2; exit 2; }
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}
module=$1
shift
args=$(printf ' %q' "$@")
remote="cd $(printf %q "$REPO") && ${SETUP:+$SETUP && }$PYTHON -m $module$args --config.distributed.initialize=true"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all --command "$remote")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
