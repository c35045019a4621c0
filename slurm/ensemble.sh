#!/bin/bash
# Ensemble of evaluation results (average of softmax probabilities), one CPU task:
#   sbatch slurm/ensemble.sh A.pt B.pt [C.pt ...] [--weights 1,1,2] [--output table.md]
# Default output: $RESNET_OUTPUT/ensemble-<job id>.md (and .json); the table is also printed to the job's log.
#SBATCH --job-name=ensemble
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file: settings and functions come from the checkout it was submitted from.
repo="${RESNET_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f $repo/slurm/env.sh ]] ||
    { echo "error: $repo/slurm/env.sh not found: sbatch from the checkout's root, or export RESNET_REPO" >&2; exit 2; }
# shellcheck source=slurm/env.sh
source "$repo/slurm/env.sh"

(($# >= 2)) || die "usage: sbatch slurm/ensemble.sh A.pt B.pt [...] [--weights 1,1,2] [--output table.md]"
cd "$RESNET_REPO" || die "cannot enter $RESNET_REPO"
output=()
[[ " $* " == *" --output"* ]] || output=(--output "$RESNET_OUTPUT/ensemble-$(job_key).md")
srun_opts=(--ntasks=1)  # whatever the allocation: one process writes the table
resnet_srun ensemble "$@" "${output[@]}"
