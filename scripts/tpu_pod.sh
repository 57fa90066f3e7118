#!/usr/bin/env bash
# clapjax on every worker of a Cloud TPU VM pod slice.
#
#   scripts/tpu_pod.sh TPU_NAME ZONE REMOTE_DIR -- CONFIG --workdir DIR [key=value ...]
#
# REMOTE_DIR is the clapjax checkout (with its .venv) on the workers, e.g. on an NFS (Filestore)
# mount every worker sees; everything after `--` is passed to `clapjax train` unchanged. DIR must be
# shared too (NFS, or a bucket mounted with gcsfuse): every worker writes its part of each checkpoint.
#
# On a TPU VM, a worker's number and the list of workers live in the GCE metadata server, which
# `jax.distributed.initialize()` reads itself: CLAPJAX_COORDINATOR=auto asks for exactly that.
# Where TPU_WORKER_ID / TPU_WORKER_HOSTNAMES are set (GKE), clapjax maps them itself.
# Preemption (spot / queued resources): recreate the slice and run the same command again; the
# run resumes from DIR's latest checkpoint.
set -euo pipefail
if [ $# -lt 4 ] || [ "$4" != "--" ]; then
    echo "usage: $0 TPU_NAME ZONE REMOTE_DIR -- CONFIG --workdir DIR [key=value ...]" >&2
    exit 2
fi
tpu=$1 zone=$2 dir=$3
shift 4
train_args=$(printf ' %q' "$@")
remote="cd $(printf %q "$dir") && export PATH=\"\$PWD/.venv/bin:\$PATH\" CLAPJAX_COORDINATOR=auto && clapjax train${train_args}"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote"
