# shellcheck shell=bash
# Functions shared by the scripts in slurm/ (sourced after env.sh).

die() {
    echo "error: $*" >&2
    exit 2
}

# The job's key: array tasks are <array job>_<task>; a requeued job keeps its id, so its run directory too.
job_key() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch}"
    fi
}

# srun `resnet ARGS...` on every task of the job (or as the array srun_opts says), in the container if one is set.
srun_opts=()
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): without this, clusters that bind tasks to
# CPUs pin each rank and all its loader workers to one core.
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
# Where `resnet prepare check` puts the manifest of a read-only data root (datamodules/manifest.py): mounted into
# containers, so a job finds the manifest written on the login node (rank 0 reads it and sends it to the others).
export RESNET_CACHE="${RESNET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/resnet-imagenet}"
resnet_srun() {
    local -a srun=(srun --kill-on-bad-exit=1 "${srun_opts[@]}")
    mkdir -p "$RESNET_OUTPUT" "$RESNET_CACHE"
    local stage_mount=""  # the node-local copy's folder, seen by a container at the same path
    [[ -z ${RESNET_STAGE_DIR:-} ]] || stage_mount=",$RESNET_STAGE_DIR:$RESNET_STAGE_DIR"
    case "$RESNET_CONTAINER" in
        "")
            local resnet="$RESNET_VENV/bin/resnet"
            [[ -x $resnet ]] || resnet=$(command -v resnet) ||
                die "no resnet in $RESNET_VENV/bin or on PATH: run \`make setup\` in $RESNET_REPO, or set RESNET_VENV or RESNET_CONTAINER"
            "${srun[@]}" "$resnet" "$@"
            ;;
        *.sif)
            "${srun[@]}" apptainer exec --nv --pwd "$RESNET_REPO" \
                --bind "$IMAGENET_DIR:$IMAGENET_DIR:ro,$RESNET_OUTPUT,$RESNET_REPO,$RESNET_CACHE$stage_mount" "$RESNET_CONTAINER" resnet "$@"
            ;;
        *)
            "${srun[@]}" --container-image="$RESNET_CONTAINER" --container-workdir="$RESNET_REPO" \
                --container-mounts="$IMAGENET_DIR:$IMAGENET_DIR:ro,$RESNET_OUTPUT:$RESNET_OUTPUT,$RESNET_REPO:$RESNET_REPO,$RESNET_CACHE:$RESNET_CACHE$stage_mount" \
                resnet "$@"
            ;;
    esac
}

# The world size comes from the allocation: `--nodes` x `--ntasks-per-node` (one task per GPU).
check_world_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --trainer.num_nodes* | --trainer.devices*)
                die "$arg: the world size comes from #SBATCH --nodes and --ntasks-per-node; change those instead" ;;
        esac
    done
    [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] || die "submit with --ntasks-per-node (one task per GPU), not --ntasks"
    # One task per GPU: Lightning gives each task (local rank) one GPU of the node.
    local tasks=${SLURM_NTASKS_PER_NODE%%(*} gpus=${SLURM_GPUS_PER_NODE:-0}
    gpus=${gpus##*:}
    if [[ $gpus =~ ^[0-9]+$ ]] && ((gpus > 0 && gpus != tasks)); then
        die "--ntasks-per-node=$tasks but --gpus-per-node=$gpus: one task per GPU; submit with --ntasks-per-node=$gpus"
    fi
    # The first node is torch's rendezvous (MASTER_ADDR): every node must resolve every node name.
    local nodes node
    if nodes=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null); then
        for node in $nodes; do
            getent hosts "$node" >/dev/null ||
                die "node $node of the allocation does not resolve on $(hostname) (getent hosts $node): the ranks" \
                    "could not reach each other; fix the cluster's name resolution (DNS or /etc/hosts) or exclude it" \
                    "(sbatch --exclude=$node)"
        done
    fi
}

# resnet_fit RECIPE [resnet fit options...]: train configs/RECIPE.yaml in $RESNET_OUTPUT/RECIPE-<job id>/.
# A requeued job finds its hpc_ckpt_N.ckpt there and resumes.
resnet_fit() {
    local recipe=$1
    shift
    [[ -f $RESNET_REPO/configs/$recipe.yaml ]] || die "$RESNET_REPO/configs/$recipe.yaml not found (RESNET_REPO)"
    check_world_args "$@"
    local run_dir="${RESNET_RUN_DIR:-}"  # set: continue that run (with --ckpt_path last) in a new job
    [[ -n $run_dir ]] || run_dir="$RESNET_OUTPUT/$recipe-$(job_key)"
    local -a wandb=()
    [[ $RESNET_WANDB == 1 ]] && wandb=(--config configs/logger/wandb.yaml)
    echo "$(date -Is) job $(job_key) restart ${SLURM_RESTART_COUNT:-0}: $recipe on ${SLURM_JOB_NUM_NODES} node(s)" \
        "x ${SLURM_NTASKS_PER_NODE} task(s), run directory $run_dir"
    cd "$RESNET_REPO" || die "cannot enter $RESNET_REPO"
    # On SLURM's signal `resnet fit` saves, writes this file and exits; the job is requeued from here, on the host,
    # where scontrol works (a container has none).
    export RESNET_REQUEUE_FILE="$run_dir/requeue.request"
    rm -f "$RESNET_REQUEUE_FILE"
    local rc=0
    # Preemption (SIGTERM, then SIGKILL after the partition's GraceTime): the tasks save and exit; this shell waits
    # for srun instead of dying first and ending the job step under them.
    trap 'echo "$(date -Is) SIGTERM: the training tasks save, then exit"' TERM
    # Last, so that no option or --config before them can change them: the world size and the run directory.
    local -a stage=()
    [[ -z ${RESNET_STAGE_DIR:-} ]] || stage=(--data.stage_dir "$RESNET_STAGE_DIR")
    resnet_srun fit --config "configs/$recipe.yaml" "${wandb[@]}" \
        --data.root "$IMAGENET_DIR" --data.num_workers "${SLURM_CPUS_PER_TASK:-8}" "${stage[@]}" "$@" \
        --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
        --trainer.default_root_dir "$run_dir" || rc=$?
    if ((rc == 143)); then
        # SIGTERM (preemption): the ranks saved and exited 143. SLURM requeues a preempted --requeue job only if it is
        # still running when its GraceTime ends (one that ends by itself is marked FAILED), so wait to be stopped.
        # Bounded: a SIGTERM from elsewhere (e.g. scancel) ends the job anyway.
        echo "$(date -Is) SIGTERM: saved; waiting for SLURM to stop and requeue the job (at most 10 min)"
        sleep 600 || true
        exit 143
    fi
    if [[ -f $RESNET_REQUEUE_FILE ]]; then
        echo "$(date -Is) requeueing job $(job_key): the next start resumes from $(cat "$RESNET_REQUEUE_FILE")"
        rm -f "$RESNET_REQUEUE_FILE"
        scontrol requeue "$(job_key)"
        exit 0
    fi
    return "$rc"
}
