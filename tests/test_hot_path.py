"""The training hot path: no step reads a value back from the device except the log steps, the ranks agree on a
signal without a blocking collective, SIGTERM saves and ends cleanly, the progress bar stays out of batch jobs.

On a GPU a value read back (`.item()`, `bool(tensor)`, a tensor made from Python numbers and copied over) makes the
host wait for every queued kernel. Here, on the CPU, the same reads are the aten operations `_local_scalar_dense`
(a tensor to a Python number) and `lift_fresh` (Python numbers to a tensor): a dispatch mode counts them per step.
tests/test_gpu.py checks the same on CUDA with torch's sync debug mode."""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import REPO, RESNET, tiny_fit_args
from train.checkpointing import hpc_checkpoints
from train.requeue import AgreedFlags
from train.cli import build_cli

HOST_READS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.nonzero.default",
              "aten.is_nonzero.default", "aten._unique2.default", "aten.masked_select.default"}


class _HostReads(TorchDispatchMode):
    """Counts, on this thread, the operations that on a GPU would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class HostReadsPerStep(pl.Callback):
    """Host reads from one training batch's start to the next one's (the step, its hooks, Lightning's logging and
    the next fetch), by the global step the batch completed."""

    def __init__(self) -> None:
        self.mode: _HostReads | None = None
        self.steps: dict[int, collections.Counter[str]] = {}

    def _close(self, step: int) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.steps[step] = self.mode.counts
            self.mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close(trainer.global_step)
        self.mode = _HostReads()
        self.mode.__enter__()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer.global_step)


def test_steps_between_log_steps_read_nothing_back_from_the_device(demo_root, tmp_path):
    # The demo recipe as `resnet fit` runs it (its callbacks, metrics, logging), one loader worker: decoding runs in
    # the worker, so the main thread holds only the step.
    args = tiny_fit_args(demo_root, tmp_path / "run", "--data.num_workers", "1", "--trainer.max_epochs", "1",
                         "--trainer.log_every_n_steps", "4", "--trainer.limit_val_batches", "0")[1:]
    cli = build_cli(args, run=False)
    probe = HostReadsPerStep()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert sorted(probe.steps) == list(range(1, 10))  # 72 images in batches of 8
    quiet = {step: dict(c) for step, c in probe.steps.items() if step % 4 and step != 9}  # 9: epoch end
    assert quiet and all(not c for c in quiet.values()), quiet
    assert sum(probe.steps[4].values()) > 0  # the dispatch mode sees the log step's reads: the probe can fail
    with open(next((tmp_path / "run/logs").glob("version_*")) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    # The throughput, loader share and lr come with the log steps (Lightning's 0-based step column: 3, 7).
    assert [int(r["step"]) for r in rows] == [3, 7]
    assert all(float(r["train/images_per_sec"]) > 0 and 0 <= float(r["train/loader_wait_share"]) <= 1 for r in rows)
    assert all(float(r["train/lr"]) > 0 for r in rows)


def _agree(rank: int, world: int, init: str, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    flags = AgreedFlags(world, lag=2)
    decisions = []
    for call in range(8):
        # Rank 1 alone sees a signal from its 4th call on (index 3): everyone acts 2 calls later, at index 5.
        decisions.append(flags.poll([rank == 1 and call >= 3, False]))
    flags.drain()
    results[rank] = decisions
    dist.destroy_process_group()


def test_ranks_agree_on_a_signal_at_the_same_step_without_waiting(tmp_path):
    ctx = mp.get_context("fork")  # a copy of this process: no second start-up of torch and Lightning
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_agree, args=(rank, 2, f"file://{tmp_path / 'store'}", results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = [[False, False]] * 5 + [[True, False]] * 3
    assert results[0] == results[1] == expected
    assert AgreedFlags(1).poll([False, True]) == [False, True]  # one process: no collective, no lag


def test_sigterm_saves_then_a_new_fit_resumes_from_that_step(demo_root, tmp_path):
    run = tmp_path / "run"
    args = tiny_fit_args(demo_root, run, "--data.num_workers", "1", "--trainer.max_epochs", "40")
    # Its own session: the signal goes to every process of the job, loader worker included, as SLURM and
    # `docker stop` send it.
    proc = subprocess.Popen([RESNET, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 240
    while not (run / "checkpoints/last.ckpt").exists():  # the first epoch is done: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Signal SIGTERM: saved" in out and "DataLoader worker" not in out, out[-3000:]
    [saved] = hpc_checkpoints(run)
    state = torch.load(saved, map_location="cpu", weights_only=False)
    step = state["global_step"]
    assert step > 9  # past the first epoch (9 steps)
    # To the end of the interrupted epoch only.
    epochs = str(state["epoch"] + 1)
    resumed = subprocess.run([RESNET, *args[:-2], "--trainer.max_epochs", epochs], cwd=REPO, capture_output=True,
                             text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {saved} at global step {step}" in resumed.stdout + resumed.stderr
    assert not hpc_checkpoints(run)  # the finished run dropped it


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_only_for_interactive_runs(demo_root, tmp_path, monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    cli = build_cli(tiny_fit_args(demo_root, tmp_path / "run")[1:], run=False)  # tiny_fit_args turns it off
    assert cli.trainer.progress_bar_callback is None
    args = [a for a in tiny_fit_args(demo_root, tmp_path / "run")[1:]]
    i = args.index("--trainer.enable_progress_bar")
    del args[i:i + 2]
    cli = build_cli(args, run=False)
    assert (cli.trainer.progress_bar_callback is not None) == terminal


def test_loader_workers_outlive_a_job_sigterm_but_not_their_parents(demo_root):
    """SLURM's SIGTERM reaches loader workers too: they keep serving batches until the main process has saved and
    shuts them down; a SIGTERM from their parent (DataLoader or multiprocessing shutdown) still ends them at once."""
    import multiprocessing

    from datamodules.imagenet import ImageNetDataModule

    dm = ImageNetDataModule(str(demo_root), batch_size=8, num_workers=1, crop_size=32, val_resize_size=36)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)
    [worker] = [p for p in multiprocessing.active_children() if p.is_alive()]
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from another process, as slurmstepd sends it
    time.sleep(0.5)
    assert worker.is_alive()
    assert next(batches)[0].shape == (8, 3, 32, 32)
    worker.terminate()  # SIGTERM from the parent
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches


def test_a_diverged_loss_stops_the_run_naming_the_step(demo_root, tmp_path):
    args = tiny_fit_args(demo_root, tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "2",
                         "--model.lr_per_256", "1e12", "--trainer.limit_val_batches", "0")[1:]
    cli = build_cli(args, run=False)
    with pytest.raises(FloatingPointError, match=r"train/loss is not finite .* at global step \d*[02468] \(lr"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step < 9  # stopped within the epoch, at a log step
    # The failed fit leaves this process as it found it: SIGTERM still ends it (Lightning's teardown re-installs the
    # handlers it found, the run's own; they hand the signal on once fit is over).
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def _worker_seed(rank: int, queue) -> None:
    from datamodules.loaders import init_loader_worker

    torch.manual_seed(1234)  # what the DataLoader gives worker 0 of a loader whose base seed is 1234
    init_loader_worker(0, rank)
    queue.put(torch.initial_seed())


def test_loader_workers_keep_lightnings_per_rank_seeds(monkeypatch):
    """Our worker_init_fn replaces the one Lightning adds under seed_everything(workers=True): it must apply
    Lightning's seeding, else every rank would draw the same augmentations (the ranks share the base seed)."""
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    ctx = mp.get_context("fork")  # the worker's signal set-up stays in a child process
    queue = ctx.Queue()
    seeds = []
    for rank in (0, 1):
        p = ctx.Process(target=_worker_seed, args=(rank, queue))
        p.start()
        seeds.append(queue.get(timeout=30))
        p.join(timeout=10)
    assert seeds[0] != seeds[1] and 1234 not in seeds
