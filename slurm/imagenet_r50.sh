#!/bin/bash
# ResNet-50 on ImageNet-1k with configs/imagenet_r50.yaml: 1 node(s) x 8 GPUs, one task per GPU (DDP).
# Global batch 256 = 8 GPUs x 32, the paper's; lr 0.1 (configs/imagenet_r50.yaml).
# Submit from the checkout's root; options after the script name go to `resnet fit`:
#   sbatch slurm/imagenet_r50.sh --data.backend dali
# Settings (ImageNet, outputs, W&B, container): slurm/env.sh. On SIGUSR1, sent 300 s before the time limit, the
# job saves hpc_ckpt_N.ckpt in its run directory and requeues itself; the next start resumes from it.
#SBATCH --job-name=imagenet_r50
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file: settings and functions come from the checkout it was submitted from.
repo="${RESNET_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f $repo/slurm/env.sh ]] ||
    { echo "error: $repo/slurm/env.sh not found: sbatch from the checkout's root, or export RESNET_REPO" >&2; exit 2; }
# shellcheck source=slurm/env.sh
source "$repo/slurm/env.sh"
resnet_fit imagenet_r50 "$@"
