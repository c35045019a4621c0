"""The SLURM scripts on a real two-node cluster (tests/slurm_cluster.py: node1 and node2 on this machine):
`sbatch slurm/imagenet_r152.sh` with CPU overrides (a task on each node, gloo, the small demo set, ResNet-18 at
32 px) interrupted three ways (SIGUSR1 before a time limit to the ranks of both nodes, preemption by a job of a
higher-priority partition, a lost node), requeued by SLURM and resumed each time into the same run directory and W&B
run, ending at the same weights as an uninterrupted job; and `slurm/chain.sh` (train -> 10-crop evaluation -> ensemble)
on 2 nodes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, last_metrics
from tests.slurm_cluster import SlurmCluster

# One cluster at a time: under `pytest -n` (make test) these tests share one worker, started first (conftest.py);
# the cluster fixture's lock keeps it so whatever the scheduler does.
pytestmark = pytest.mark.slow

# What differs from the ImageNet recipes on a 2-core machine without a GPU: a task on each of the two nodes.
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
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
    # Two clusters at once would share this machine's 2 cores and the tests' time bounds: a second pytest process
    # (another xdist worker, another checkout) waits for the first one's cluster to stop, 10 minutes at most.
    with open("/tmp/resnet-slurm-tests.lock", "w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another test cluster held /tmp/resnet-slurm-tests.lock for 10 minutes")
                time.sleep(1)
        yield from _cluster()


def _cluster():
    # munged must reach its socket through every parent folder: not under pytest's private tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="resnet-slurm-", dir="/tmp"))
    folder.chmod(0o755)
    # 4 CPUs a node on 2 cores: the chain's two trainings of 2 tasks a node run side by side; an urgent job asking
    # for node2's 4 preempts the interrupted job there.
    with SlurmCluster(folder, cpus=4, nodes=2) as c:
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
        # One intra-op thread a rank everywhere: Lightning gives a CPU rank cores / ranks-on-its-node threads, and
        # a conv's sums depend on the thread count (2 ranks on one node would not match 2 ranks on two).
        OMP_NUM_THREADS="1",
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


def wait_for_log(cluster, job: str, log: Path, pattern: str, timeout: float = 240) -> re.Match:
    """Polls `log` for `pattern` while the job runs, is requeued or pending (a requeued job held for its BeginTime
    is started at once, as `wait_for(release=True)` does)."""
    end, held_since = time.monotonic() + timeout, None
    while time.monotonic() < end:
        if found := re.search(pattern, read_log(log)):
            return found
        info = cluster.job(job)
        assert info["JobState"] in {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED", "REQUEUE_HOLD"}, read_log(log)[-3000:]
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= 5:
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(0.5)
    raise AssertionError(f"job {job}: no {pattern!r} in {log} after {timeout} s:\n{read_log(log)[-3000:]}")


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_interrupted_job_resumes_each_time_and_ends_as_the_uninterrupted_one(cluster, job_env, tmp_path):
    out = Path(job_env["RESNET_OUTPUT"])
    # 10 epochs x 9 steps: the three interruptions come in the first two.
    fit = [*FIT_CPU, "--trainer.max_epochs", "10", "--data.num_workers", "1"]
    reference_log, log = tmp_path / "reference.log", tmp_path / "train.log"
    # The same world (2 ranks) on node1 alone: it stays up when node2 is lost. Gloo's all-reduce of 2 ranks sums
    # alike on one node or two: the weights must match bit for bit.
    reference = sbatch(cluster, job_env, *SBATCH_CPU, "--nodes=1", "--ntasks-per-node=2", "--nodelist=node1",
                       f"--output={reference_log}", "slurm/imagenet_r152.sh", *fit)
    # One loader worker per rank: SLURM signals every process of the step, workers included. Periodic checkpoints
    # every 3 s: the third interruption (a lost node) resumes from one. The data staged to each node's scratch folder
    # (RESNET_STAGE_DIR: once a node; each restart reuses the copy there).
    job = sbatch(cluster, {**job_env, "RESNET_STAGE_DIR": f"{cluster.local}/stage"}, *SBATCH_CPU,
                 "--partition=preemptible", f"--output={log}", "slurm/imagenet_r152.sh",
                 *fit, "--requeue.checkpoint_every_minutes", "0.05")
    run = out / f"imagenet_r152-{job}"

    # 1. SIGUSR1 (SLURM's warning before the time limit) to the ranks on both nodes, once training has stepped:
    # saved once, requeued, resumed on both nodes at the same step.
    wait_for_log(cluster, job, run / "logs" / "version_0" / "metrics.csv", r"train/loss")
    cluster.run("scancel", "--signal=USR1", job)
    first = wait_for_log(cluster, job, log, r"Signal SIGUSR1: saved (\S+) at global step (\d+)")
    resumed = wait_for_log(cluster, job, log, r"Resumed from (\S+) at global step (\d+), epoch \d+ \(SLURM job (\d+), restart 1\)")
    assert first.group(1) == resumed.group(1) == str(run / "hpc_ckpt_1.ckpt") and first.group(2) == resumed.group(2)
    assert resumed.group(3) == job and int(first.group(2)) > 0
    assert len(re.findall(r"Signal SIGUSR1: saved", read_log(log))) == 1

    # 2. Preemption: a job of the `urgent` partition needs the CPUs; SLURM sends SIGTERM (GraceTime 20 s), the ranks
    # save and exit 143, the job script waits to be stopped, SLURM requeues the job and starts it again once the urgent
    # job is done.
    urgent = sbatch(cluster, job_env, "--partition=urgent", "--nodes=1", "--nodelist=node2", "--ntasks=4",
                    "--cpus-per-task=1", "--time=5", f"--output={tmp_path / 'urgent.log'}", "--wrap", "sleep 2")
    preempted = wait_for_log(cluster, job, log, r"Signal SIGTERM: saved (\S+) at global step (\d+)")
    wait_for(cluster, urgent, {"COMPLETED"}, timeout=120)
    again = wait_for_log(cluster, job, log, r"Resumed from (\S+) at global step (\d+), epoch \d+ \(SLURM job \d+, restart 2\)")
    assert again.groups() == preempted.groups() and again.group(1) == str(run / "hpc_ckpt_2.ckpt")

    # 3. No signal at all: node2 lost after a periodic checkpoint. It stops answering (every process on it frozen:
    # the peers' connections hang, as when a node's network goes); SLURM marks it down after SlurmdTimeout and
    # requeues the job (NODE_FAIL). Powered off, then back: the job resumes on both nodes from the newest checkpoint,
    # losing at most the steps since the periodic one.
    wait_for_log(cluster, job, log, r"restart 2\)[\s\S]*Periodic checkpoint (\S+) at global step (\d+)")
    cluster.signal_node("node2", signal.SIGSTOP)
    wait_for(cluster, job, {"PENDING", "REQUEUED"}, timeout=120)
    assert f"requeue job JobId={job} due to failure of node node2" in read_log(cluster.dir / "slurmctld.log")
    cluster.signal_node("node2", signal.SIGKILL)
    cluster.slurmd["node2"].wait(timeout=30)
    cluster.start_node("node2")
    third = wait_for_log(cluster, job, log, r"Resumed from (\S+) at global step (\d+), epoch \d+ \(SLURM job \d+, restart 3\)")
    # The newest checkpoint: the last periodic one, or an epoch-end last.ckpt written after it.
    assert third.group(1) in (str(run / "checkpoints" / "periodic.ckpt"), str(run / "checkpoints" / "last.ckpt"))
    lost = read_log(log).split("restart 2)")[-1].split("restart 3)")[0]
    last_periodic = re.findall(r"Periodic checkpoint \S+ at global step (\d+)", lost)[-1]
    assert int(third.group(2)) >= int(last_periodic) > int(again.group(2))  # at most the steps since it lost

    info = wait_for(cluster, job, {"COMPLETED"}, timeout=300, release=True)
    wait_for(cluster, reference, {"COMPLETED"}, timeout=300)
    text = read_log(log)
    assert info["Restarts"] == "3", text[-3000:]
    assert f"the job script requeues the job ({run}/requeue.request)" in text
    assert "Traceback" not in text.split("restart 3)")[-1], text[-3000:]
    # Two nodes each time: node rank 0 and 1, one task each (world size 2), reading the data from its node's copy,
    # made once on each node and reused by each of the three restarts there.
    assert {"node1", "node2"} <= set(re.findall(r"host (node\d)", text)), text[-3000:]
    staged = re.findall(r"Staged \S+ on (node\d): 102 files \(\S+ MB\) (copied|reused)", text)
    assert sorted(staged) == sorted([(n, "copied") for n in ("node1", "node2")] + [(n, "reused") for n in ("node1", "node2")] * 3), staged
    assert len(re.findall(rf"read from {cluster.local}/stage/", text)) == 2 * 4

    # The same run: every step trained once, on the batches of the uninterrupted job, to bit-identical weights and
    # SGD momentum (2 ranks, gloo, loader workers, three interruptions).
    a, b = final_state(out / f"imagenet_r152-{reference}"), final_state(run)
    assert a["global_step"] == b["global_step"] == 10 * 9 and b["epoch"] == 9
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert sorted(p.name for p in (run / "logs").iterdir()) == [f"version_{i}" for i in range(4)]
    assert not list(run.glob("**/.*partial")) and not list(run.glob("hpc_ckpt_*.ckpt"))
    assert not (run / "checkpoints/periodic.ckpt").exists(), "a finished run keeps no periodic checkpoint"

    # One W&B run across the four lives: four offline segments with the id in wandb_run_id.
    run_id = (run / "wandb_run_id").read_text().strip()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 4, segments
    assert all(seg.name.endswith(f"-{run_id}") and (seg / f"run-{run_id}.wandb").stat().st_size > 0 for seg in segments)
    assert job in run_id


def test_chain_trains_evaluates_and_ensembles(cluster, job_env, tmp_path):
    env = {
        **job_env,
        "RESNET_WANDB": "0",
        "RESNET_EVAL_PROTOCOL": "10crop",
        # 2 nodes x 2 tasks: world size 4.
        "RESNET_SBATCH_OPTS": " ".join([*SBATCH_CPU, "--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.log"]),
    }
    proc = cluster.run_env(env, str(REPO / "slurm/chain.sh"), "imagenet_r50", "imagenet_r101", "--", *FIT_CPU,
                           "--trainer.max_epochs", "1", "--data.stage_dir", f"{cluster.local}/stage-chain")
    jobs = re.findall(r"(imagenet_r\d+): training job (\d+) .*, 10crop evaluation job (\d+)", proc.stdout)
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
        run = Path(env["RESNET_OUTPUT"]) / f"{recipe}-{train}"
        assert last_metrics(run)["val/images"] == 30  # the training's validation, too, counts each image once
        result = json.loads((run / "eval" / "10crop.json").read_text())
        assert result["protocol"] == "10crop" and result["images"] == 30  # every val image once over the 4 ranks
        assert 0.0 <= result["top1_err"] <= 100.0
        # Global ranks, node ranks and local ranks as the allocation lays them out, equal training shards.
        ranks = set(re.findall(r"rank (\d)/4 \(node rank (\d), local rank (\d), host (node\d)\): 18 of 72 training",
                               read_log(tmp_path / f"{recipe}-{train}.log")))
        assert ranks == {("0", "0", "0", "node1"), ("1", "0", "1", "node1"), ("2", "1", "0", "node2"),
                         ("3", "1", "1", "node2")}, ranks
    # Both trainings read each node's copy of the data, made once on that node (the other job waited or reused it):
    # a folder of its own on each node, holding the 102 images.
    staged = re.findall(r"Staged \S+ on (node\d): 102 files \(\S+ MB\) (copied|reused)", logs)
    assert sorted(staged) == [("node1", "copied"), ("node1", "reused"), ("node2", "copied"), ("node2", "reused")], staged
    for node in ("node1", "node2"):
        copies = list((cluster.dir / "nodes" / node / "local" / "stage-chain").glob("*/.resnet-stage.json"))
        assert len(copies) == 1 and len(json.loads(copies[0].read_text())["files"]) == 102, copies
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


def test_launch_checks_name_what_to_change(cluster):
    """Before any process group starts: tasks per node against GPUs per node, and node names that do not resolve."""
    slurm = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"}
    proc = run_script("imagenet_r152.sh", SLURM_NTASKS_PER_NODE="2", SLURM_GPUS_PER_NODE="8", **slurm)
    assert proc.returncode == 2, proc.stderr
    assert "--ntasks-per-node=2 but --gpus-per-node=8: one task per GPU; submit with --ntasks-per-node=8" in proc.stderr
    proc = run_script("imagenet_r152.sh", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="ghost[1-2]",
                      SLURM_CONF=cluster.env["SLURM_CONF"], **slurm)
    assert proc.returncode == 2, proc.stderr
    assert "node ghost1 of the allocation does not resolve" in proc.stderr and "--exclude=ghost1" in proc.stderr
