# shellcheck shell=bash
# Site settings for every script in slurm/, sourced by each of them (then it loads their functions, common.sh).
# Override one by exporting it before `sbatch` (sbatch hands the submitting shell's environment to the job), or
# change its default here once per cluster.

# The checkout holding configs/ (sbatch from its root: that is the job's SLURM_SUBMIT_DIR).
export RESNET_REPO="${RESNET_REPO:-${repo:-${SLURM_SUBMIT_DIR:-$PWD}}}"
# ImageNet as `resnet prepare imagenet` lays it out (train/ and val/, one folder per wnid), on a shared file system.
export IMAGENET_DIR="${IMAGENET_DIR:-/data/imagenet}"
# Run directories: $RESNET_OUTPUT/<recipe>-<job id>/ holds checkpoints/, logs/, wandb/ and eval/.
export RESNET_OUTPUT="${RESNET_OUTPUT:-$RESNET_REPO/runs}"
# W&B project. Without WANDB_API_KEY (or `wandb login`) runs are written offline into the run directory:
# upload them later with `wandb sync $RESNET_OUTPUT/<run>/wandb/offline-run-*`.
# Nodes with an API key but no internet: export WANDB_MODE=offline as well.
export WANDB_PROJECT="${WANDB_PROJECT:-resnet-imagenet}"
# 0: train without W&B (CSV logs only).
export RESNET_WANDB="${RESNET_WANDB:-1}"
# Empty: run the checkout's virtual environment, $RESNET_VENV. An image name or .sqsh file (pyxis/enroot, e.g.
# `docker://ghcr.io#you/resnet-imagenet:1.0` or `/shared/resnet.sqsh`): srun --container-image. A .sif file:
# apptainer exec --nv. The checkout, ImageNet and the outputs are mounted at the same paths inside.
export RESNET_CONTAINER="${RESNET_CONTAINER:-}"
export RESNET_VENV="${RESNET_VENV:-$RESNET_REPO/.venv}"
# Empty: read the data from IMAGENET_DIR. A node-local folder (NVMe scratch such as /local/scratch/$USER, the
# same path on every node): before training each node copies the data there once (`--data.stage_dir`, README
# "Node-local data") and reuses the copy after a requeue; mounted into containers.
export RESNET_STAGE_DIR="${RESNET_STAGE_DIR:-}"

# shellcheck source=slurm/common.sh
source "$RESNET_REPO/slurm/common.sh"
