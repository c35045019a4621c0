#!/bin/bash
# ILSVRC evaluation of one checkpoint on ImageNet val, 1 node x 8 GPUs:
#   sbatch slurm/eval_10crop.sh CKPT [10crop|center|multiscale] [resnet evaluate options...]
# CKPT is <run dir>/checkpoints/best.ckpt (or last.ckpt); the result goes to <run dir>/eval/<protocol>.pt and .json,
# the input of slurm/ensemble.sh. 10-crop on 50,000 images is 500,000 forward passes.
#SBATCH --job-name=eval_10crop
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file: settings and functions come from the checkout it was submitted from.
repo="${RESNET_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f $repo/slurm/env.sh ]] ||
    { echo "error: $repo/slurm/env.sh not found: sbatch from the checkout's root, or export RESNET_REPO" >&2; exit 2; }
# shellcheck source=slurm/env.sh
source "$repo/slurm/env.sh"

ckpt=${1:?usage: sbatch slurm/eval_10crop.sh CKPT [10crop|center|multiscale] [resnet evaluate options]}
shift
protocol=10crop
if [[ -n ${1:-} && ${1:0:1} != - ]]; then  # a protocol (resnet evaluate checks its name), not an option
    protocol=$1
    shift
fi
cd "$RESNET_REPO" || die "cannot enter $RESNET_REPO"
[[ -f $ckpt ]] || die "$ckpt: no such checkpoint (did the training job finish?)"
check_world_args "$@"
output="$(dirname "$(dirname "$ckpt")")/eval/$protocol.pt"
echo "$(date -Is) job $(job_key): $protocol evaluation of $ckpt -> $output"
resnet_srun evaluate --ckpt "$ckpt" --protocol "$protocol" --output "$output" \
    --data.root "$IMAGENET_DIR" --data.num_workers "${SLURM_CPUS_PER_TASK:-8}" "$@" \
    --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE"
