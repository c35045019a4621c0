#!/usr/bin/env bash
# `resnet` in the Docker image on this workstation: all GPUs, the host's IPC namespace (DataLoader workers share
# batches through /dev/shm; Docker's default 64 MB kills them), ImageNet read-only at /data/imagenet (the recipes'
# data.root), the outputs folder read-write at runs/ in the container's working directory, and the caller's
# uid:gid so that what it writes belongs to them. Every argument goes to `resnet` unchanged:
#   docker/run.sh fit --config configs/imagenet_r50.yaml
#   docker/run.sh evaluate --ckpt runs/imagenet_r50/checkpoints/best.ckpt --data.root /data/imagenet \
#       --protocol 10crop --output runs/results/r50_10crop.pt
#   docker/run.sh ensemble runs/results/r50_multiscale.pt runs/results/r101_multiscale.pt --output runs/results/ensemble.md
# Paths are the container's: runs/... is OUTPUT_DIR on the host, /data/imagenet is IMAGENET_DIR; configs/ is the
# image's copy (rebuild after editing one, or put your own yaml under OUTPUT_DIR and pass runs/my.yaml).
#
# Environment, with defaults:
#   IMAGENET_DIR=/data/imagenet       host folder holding train/ and val/ (see README, Preparing ImageNet)
#   OUTPUT_DIR=./runs                 host folder for runs, checkpoints, results and offline W&B files
#   RESNET_IMAGE=resnet-imagenet:latest   built by docker/build.sh
#   WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, CUDA_VISIBLE_DEVICES: passed on by name when set
#     (the key's value never appears on a command line); W&B runs offline without a key.
set -euo pipefail

workdir=/workspace/resnet-imagenet   # the Dockerfile's WORKDIR
imagenet_dir=${IMAGENET_DIR:-/data/imagenet}
output_dir=${OUTPUT_DIR:-./runs}
image=${RESNET_IMAGE:-resnet-imagenet:latest}

if [[ ! -d $imagenet_dir ]]; then
    echo "docker/run.sh: IMAGENET_DIR=$imagenet_dir is not a folder: set IMAGENET_DIR to the host folder holding" \
        "ImageNet's train/ and val/" >&2
    exit 2
fi
mkdir -p "$output_dir"   # created by Docker it would belong to root
imagenet_dir=$(cd "$imagenet_dir" && pwd -P)
output_dir=$(cd "$output_dir" && pwd -P)

args=(run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)"
    -v "$imagenet_dir:/data/imagenet:ro"
    -v "$output_dir:$workdir/runs")
for name in WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY WANDB_MODE CUDA_VISIBLE_DEVICES; do
    if [[ -n ${!name+set} ]]; then
        args+=(-e "$name")
    fi
done
if [[ -t 0 && -t 1 ]]; then
    args+=(-it)   # Ctrl-C reaches the training; progress bars draw in place
fi

exec docker "${args[@]}" "$image" "$@"
