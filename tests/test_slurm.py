"""The SLURM scripts on a real one-node cluster (tests/slurm_cluster.py): `sbatch slurm/imagenet_r152.sh` with CPU
overrides (2 tasks, gloo, the small demo set, ResNet-18 at 32 px), preempted with SIGUSR1, requeued, resumed at the
same step into the same run directory and W&B run, then evaluated by a job chained on it; and `slurm/chain.sh`
(train -> evaluate -> ensemble)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow

# What differs from the ImageNet recipes on a 2-core machine without a GPU.
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
FIT_CPU = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    "--model.arch", "resnet18", "--model.num_classes", "6", "--model.channels_last", "false",
    "--data.crop_size", "32", "--data.val_resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
]
EVAL_CPU = ["--trainer.accelerator", "cpu", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def cluster():
    # munged must reach its socket through every parent folder: not under pytest's private tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="resnet-slurm-", dir="/tmp"))
    folder.chmod(0o755)
    with SlurmCluster(folder) as c:
        yield c


@pytest.fixture
def job_env(cluster, demo_root, tmp_path) -> dict[str, str]:
    """The submitting shell's environment, as a user sets it (slurm/env.sh), with W&B offline for want of a key."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("WANDB_")}
    env.update(
        IMAGENET_DIR=str(demo_root),
        RESNET_OUTPUT=str(tmp_path / "runs"),
        RESNET_VENV=str(Path(sys.executable).parent.parent),
        HOME=str(tmp_path / "home"),  # no ~/.netrc W&B login: offline
        PYTHONWARNINGS="ignore",
    )
    return env


def sbatch(cluster, env, *args: str) -> str:
    proc = cluster.run_env(env, "sbatch", "--parsable", *args)
    return proc.stdout.strip().split(";")[0]


def wait_for(cluster, job: str, states: set[str], timeout: float, release: bool = False) -> dict[str, str]:
    """Polls until the job reaches one of `states`. `release`: start a requeued job at once instead of after
    SLURM's ~2-minute BeginTime hold."""
    end, held_since = time.monotonic() + timeout, None
    while time.monotonic() < end:
        info = cluster.job(job)
        if info["JobState"] in states:
            return info
        if release and info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            # Not within the first seconds: slurmd refuses to launch a job it is still killing ("Job 1 already
            # killed, do not launch batch job"), which fails the requeued job (seen once under load).
            if time.monotonic() - held_since >= 5:
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        if info["JobState"] in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            break
        time.sleep(1)
    raise AssertionError(f"job {job}: {info['JobState']} ({info.get('Reason')}), expected {states}")


def read_log(path: Path) -> str:
    return path.read_text() if path.exists() else "(no log)"


def test_requeue_resumes_same_step_run_dir_and_wandb_run_then_evaluates(cluster, job_env, tmp_path):
    out = Path(job_env["RESNET_OUTPUT"])
    log = tmp_path / "train.log"
    # One loader worker per rank: SLURM signals every process of the step, workers included.
    job = sbatch(cluster, job_env, *SBATCH_CPU, f"--output={log}", "slurm/imagenet_r152.sh", *FIT_CPU,
                 "--trainer.max_epochs", "6", "--data.num_workers", "1")
    run = out / f"imagenet_r152-{job}"
    ckpt = run / "checkpoints" / "best.ckpt"
    evaluation = sbatch(cluster, job_env, *SBATCH_CPU, f"--output={tmp_path / 'eval.log'}",
                        f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes", "slurm/eval_10crop.sh",
                        str(ckpt), "10crop", *EVAL_CPU)

    # Signal once training has stepped: the first epoch's rows are in metrics.csv.
    metrics = run / "logs" / "version_0" / "metrics.csv"
    end = time.monotonic() + 180
    while not (metrics.exists() and "train/loss" in metrics.read_text()) and time.monotonic() < end:
        assert cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, read_log(log)
        time.sleep(1)
    cluster.run("scancel", "--signal=USR1", job)
    info = wait_for(cluster, job, {"COMPLETED"}, timeout=300, release=True)
    text = read_log(log)
    assert info["Restarts"] == "1", text[-3000:]

    saved = re.search(r"Signal SIGUSR1: saved (\S+) at global step (\d+)", text)
    resumed = re.search(r"Resumed from (\S+) at global step (\d+), epoch \d+ \(SLURM job (\d+), restart 1\)", text)
    assert saved and resumed, text[-3000:]
    assert saved.group(1) == resumed.group(1) == str(run / "hpc_ckpt_1.ckpt")
    assert saved.group(2) == resumed.group(2) and int(saved.group(2)) > 0
    assert resumed.group(3) == job
    assert "config.yaml" not in text.split("Resumed from")[0].split("restart 1:")[-1]  # no "config.yaml exists"
    # The job script requeued it from the host after srun returned (no scontrol in a container).
    assert f"the job script requeues the job ({run}/requeue.request)" in text
    assert f"requeueing job {job}: the next start resumes from {run}/hpc_ckpt_1.ckpt" in text
    assert not (run / "requeue.request").exists()

    # Same run directory: the second life logged into it and finished the whole schedule (6 epochs x 9 steps of
    # 2 ranks x 4 of the 72 images).
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 * 9 and final["epoch"] == 5
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0", "version_1"]
    assert not list(run.glob(".*partial")) and not list(run.glob("checkpoints/.*partial"))
    assert not list(run.glob("hpc_ckpt_*.ckpt")), "a finished run keeps no requeue checkpoint (last.ckpt is newer)"

    # One W&B run across both lives: two offline segments with the same id, the one in wandb_run_id.
    run_id = (run / "wandb_run_id").read_text().strip()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    assert all(seg.name.endswith(f"-{run_id}") and (seg / f"run-{run_id}.wandb").stat().st_size > 0 for seg in segments)
    assert job in run_id

    # The evaluation job waited through the requeue (afterok) and evaluated the checkpoint.
    wait_for(cluster, evaluation, {"COMPLETED"}, timeout=180)
    result = json.loads((run / "eval" / "10crop.json").read_text())
    assert result["protocol"] == "10crop" and result["images"] == 30, result
    assert 0.0 <= result["top1_err"] <= 100.0


def test_chain_trains_evaluates_and_ensembles(cluster, job_env, tmp_path):
    env = {
        **job_env,
        "RESNET_WANDB": "0",
        "RESNET_EVAL_PROTOCOL": "center",
        "RESNET_SBATCH_OPTS": " ".join([*SBATCH_CPU, f"--output={tmp_path}/%x-%j.log"]),
    }
    proc = cluster.run_env(env, str(REPO / "slurm/chain.sh"), "imagenet_r50", "imagenet_r101", "--", *FIT_CPU,
                           "--trainer.max_epochs", "1")
    jobs = re.findall(r"(imagenet_r\d+): training job (\d+) .*, center evaluation job (\d+)", proc.stdout)
    ensemble = re.search(r"ensemble job (\d+): (\S+)", proc.stdout)
    assert len(jobs) == 2 and ensemble, proc.stdout + proc.stderr
    # Submitted at once, each waiting on its inputs: the trainings take longer than this check.
    assert all(cluster.job(e)["Dependency"] == f"afterok:{t}(unfulfilled)" for _, t, e in jobs)
    assert cluster.job(ensemble.group(1))["Dependency"].count("afterok:") == 2

    wait_for(cluster, ensemble.group(1), {"COMPLETED"}, timeout=420)
    logs = "\n".join(read_log(p) for p in sorted(tmp_path.glob("*.log")))
    for recipe, train, evaluation in jobs:
        for j in (train, evaluation):
            assert cluster.job(j)["JobState"] == "COMPLETED", logs[-3000:]
        result = json.loads((Path(env["RESNET_OUTPUT"]) / f"{recipe}-{train}" / "eval" / "center.json").read_text())
        assert result["images"] == 30
    table = Path(ensemble.group(2)).read_text()
    assert table.count("imagenet_r50-") >= 1 and table.count("imagenet_r101-") >= 1 and "ensemble" in table.lower(), table


# Input errors, caught by the scripts before anything runs (no cluster needed: `bash` stands in for sbatch).
def run_script(script: str, *args: str, **env: str):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(REPO / "slurm" / script), *args], env={**base, **env}, cwd="/",
                          capture_output=True, text=True, timeout=30)


def test_scripts_name_the_checkout_they_cannot_find():
    proc = run_script("imagenet_r50.sh", SLURM_SUBMIT_DIR="/tmp", SLURM_JOB_ID="7")
    assert proc.returncode == 2
    assert "/tmp/slurm/env.sh not found: sbatch from the checkout's root, or export RESNET_REPO" in proc.stderr


def test_world_size_options_are_refused_and_ntasks_per_node_required():
    slurm = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}
    proc = run_script("imagenet_r152.sh", "--trainer.devices", "4", SLURM_NTASKS_PER_NODE="8", **slurm)
    assert proc.returncode == 2 and "--trainer.devices: the world size comes from #SBATCH --nodes" in proc.stderr
    proc = run_script("imagenet_r152.sh", **slurm)
    assert proc.returncode == 2 and "submit with --ntasks-per-node (one task per GPU), not --ntasks" in proc.stderr
    proc = run_script("eval_10crop.sh", "/nonexistent/best.ckpt", SLURM_NTASKS_PER_NODE="8", **slurm)
    assert proc.returncode == 2 and "/nonexistent/best.ckpt: no such checkpoint" in proc.stderr
    proc = run_script("ensemble.sh", "only_one.pt", **slurm)
    assert proc.returncode == 2 and "usage: sbatch slurm/ensemble.sh A.pt B.pt" in proc.stderr
    proc = subprocess.run([str(REPO / "slurm/chain.sh"), "imagenet_r18"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "slurm/imagenet_r18.sh not found" in proc.stderr
