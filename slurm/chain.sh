#!/bin/bash
# Train, evaluate and ensemble as chained SLURM jobs, from the checkout's root on a login node:
#   slurm/chain.sh [RECIPE ...] [-- resnet fit options]     (RECIPE default: imagenet_r50 imagenet_r101 imagenet_r152)
# Per recipe: sbatch slurm/RECIPE.sh, then slurm/eval_10crop.sh on its best.ckpt with --dependency=afterok (a
# requeued training keeps its job id, so the evaluation waits through requeues); then one slurm/ensemble.sh over
# all evaluations, after all of them. RESNET_EVAL_PROTOCOL: 10crop (default), center or multiscale.
# RESNET_SBATCH_OPTS: extra sbatch options for every job, e.g. "--partition=gpu --account=vision".
set -euo pipefail
RESNET_REPO="${RESNET_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=slurm/env.sh
source "$RESNET_REPO/slurm/env.sh"

recipes=()
while (($#)) && [[ $1 != -- ]]; do
    recipes+=("$1")
    shift
done
(($#)) && shift  # the `--`
((${#recipes[@]})) || recipes=(imagenet_r50 imagenet_r101 imagenet_r152)
protocol="${RESNET_EVAL_PROTOCOL:-10crop}"
read -ra opts <<<"${RESNET_SBATCH_OPTS:-}"
cd "$RESNET_REPO" || die "cannot enter $RESNET_REPO"
for recipe in "${recipes[@]}"; do
    [[ -f slurm/$recipe.sh ]] || die "slurm/$recipe.sh not found (recipes: imagenet_r50 imagenet_r101 imagenet_r152)"
done

submit() {  # sbatch ARGS... -> job id
    local id
    id=$(sbatch --parsable "${opts[@]}" "$@") || die "sbatch $* failed"
    echo "${id%%;*}"
}

results=()
evals=()
for recipe in "${recipes[@]}"; do
    train=$(submit "slurm/$recipe.sh" "$@")
    ckpt="$RESNET_OUTPUT/$recipe-$train/checkpoints/best.ckpt"
    eval=$(submit --dependency="afterok:$train" --kill-on-invalid-dep=yes slurm/eval_10crop.sh "$ckpt" "$protocol")
    echo "$recipe: training job $train ($RESNET_OUTPUT/$recipe-$train), $protocol evaluation job $eval"
    results+=("$RESNET_OUTPUT/$recipe-$train/eval/$protocol.pt")
    evals+=("$eval")
done
if ((${#results[@]} >= 2)); then
    deps=$(IFS=:; echo "${evals[*]}")
    table="$RESNET_OUTPUT/ensemble-$(IFS=-; echo "${recipes[*]}")-$protocol-${evals[0]}.md"
    ens=$(submit --dependency="afterok:$deps" --kill-on-invalid-dep=yes slurm/ensemble.sh "${results[@]}" --output "$table")
    echo "ensemble job $ens: $table"
fi
