"""Preemption-proof training: an interrupted and resumed run is the same run.

- Bit-exact: a run interrupted by SIGUSR1 through the real handler (at step 1, at an epoch's last step, twice in one
  epoch), and by a crash at an epoch boundary, resumed each time, ends with weights and optimizer state equal to an
  uninterrupted run's, with loader workers. (Two processes: tests/test_slurm.py, on the real SLURM cluster.)
- Every backend continues a resumed epoch with exactly the samples the uninterrupted run reads next.
- The torchvision backend's crops are a function of (seed, epoch, index): the same on 0, 1 and 3 workers.
- Signals during start-up; no silent starts (`--ckpt_path last` with nothing to resume, validate without weights,
  unreadable checkpoints, a fresh run's W&B id)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules.folder import ImageFolderDataset, sample_seed
from datamodules.imagenet import ImageNetDataModule
from datamodules.order import rank_order
from tests.conftest import REPO, RESNET, tiny_fit_args
from train.checkpointing import hpc_checkpoints, newest_checkpoint, resume_path
from train.signals import NOTHING_NEW, Requeued
from train.signals import REQUEUE_EXIT
from train.cli import build_cli

SLURM_ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "resume-test", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                  "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1",
                  "SLURM_NODELIST": "localhost"}


class SignalBeforeStep(pl.Callback):
    """Sends this process `signal_name` as the batch that completes each of `steps` starts; the run saves at the end
    of that batch (one process: no agreement lag). A resumed run never signals at or before its start step."""

    def __init__(self, steps: list[int], signal_name: str = "SIGUSR1"):
        self.steps, self.signum, self.start = set(steps), getattr(signal, signal_name), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        if step in self.steps and step > self.start:
            os.kill(os.getpid(), self.signum)


class Crash(Exception):
    pass


class CrashAtEpochStart(pl.Callback):
    """A failure without a signal (a killed rank, a lost node) right after an epoch-end checkpoint."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, Path(marker)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and not self.marker.exists():  # once
            self.marker.touch()
            raise Crash(f"crash at the start of epoch {self.epoch}")


class BatchLog(pl.Callback):
    """(global step, labels, image checksum) of every training batch, one JSON line each, across all lives."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, labels = batch
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, labels.tolist(), float(images.double().sum())]) + "\n")


def fit(args: list[str], *callbacks: tuple[str, dict]) -> pl.Trainer:
    """`resnet fit ARGS` in this process, as the command line runs it (its resume logic included), plus callbacks
    of this module given as (class name, init args)."""
    config = [{"class_path": f"{__name__}.{name}", "init_args": init} for name, init in callbacks]
    return build_cli(["fit", *args, "--trainer.callbacks", json.dumps(config)]).trainer


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fit_args(demo_root: Path, run: Path, *extra: str) -> list[str]:
    # The step schedule: a cosine's length would depend on max_epochs, which the lives share anyway.
    return tiny_fit_args(demo_root, run, "--data.num_workers", "2", "--trainer.max_epochs", "2",
                         "--trainer.limit_val_batches", "2", *extra)[1:]


def states_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors (weights, buffers, SGD momentum) that differ between two checkpoints."""
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    diff += [f"momentum {i}" for i in sa if not torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])]
    if a["lr_schedulers"] != b["lr_schedulers"]:
        diff.append("lr_schedulers")
    return diff


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(demo_root, tmp_path, monkeypatch):
    """72 images, batch 8: 9 steps an epoch, 18 in all, 2 loader workers. Lives of the interrupted run:
    SIGUSR1 at step 1 | resumed with `--ckpt_path last` (only a requeue checkpoint there), SIGUSR1 at step 9, the
    epoch's last | resumed, crash as epoch 1 starts (after last.ckpt) | resumed from last.ckpt, SIGUSR1 at 11 and 14
    (twice in one epoch) | resumed twice more to the end."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    for key, value in SLURM_ONE_TASK.items():  # SIGUSR1 means "requeue" in a SLURM job only
        monkeypatch.setenv(key, value)
    reference, rows_ref = tmp_path / "reference", tmp_path / "reference.jsonl"
    fit(fit_args(demo_root, reference), ("BatchLog", {"path": str(rows_ref)}))

    run, rows = tmp_path / "interrupted", tmp_path / "interrupted.jsonl"
    callbacks = [("BatchLog", {"path": str(rows)}), ("SignalBeforeStep", {"steps": [1, 9, 11, 14]}),
                 ("CrashAtEpochStart", {"epoch": 1, "marker": str(tmp_path / "crashed")})]
    saved_at = []
    for life in range(8):
        extra = ("--ckpt_path", "last") if life == 1 else ()
        try:
            trainer = fit(fit_args(demo_root, run, *extra), *callbacks)
            break
        except Requeued as e:
            saved_at.append(torch.load(str(e), map_location="cpu", weights_only=False)["global_step"])
            if life == 0:
                assert [p.name for p in hpc_checkpoints(run)] == ["hpc_ckpt_1.ckpt"]
                assert not (run / "checkpoints").exists()  # nothing but the requeue checkpoint to resume from
        except Crash:
            saved_at.append("crash")
    assert saved_at == [1, 9, "crash", 11, 14], saved_at
    assert trainer.global_step == 18 and not hpc_checkpoints(run) and not (run / "checkpoints/periodic.ckpt").exists()

    # Each step trained on exactly the batch of the uninterrupted run: no batch twice, none left out.
    assert [r[0] for r in read_rows(rows)] == list(range(1, 19))
    assert read_rows(rows) == read_rows(rows_ref)
    a = torch.load(reference / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert states_equal(a, b) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # FFCV's numba finaliser noise
@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_each_backend_resumes_an_epoch_with_the_samples_the_uninterrupted_run_reads_next(backend, tmp_path):
    """24 classes of one image each: a label is a sample id. Rank 1 of 2, batch 2 a rank: 6 batches an epoch."""
    if backend != "torchvision":
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    from PIL import Image
    import numpy as np

    root = tmp_path / "ids"
    for i in range(24):
        for split in ("train", "val"):
            (root / split / f"c{i:02d}").mkdir(parents=True)
            pixels = np.full((40, 48, 3), (10 * i) % 256, np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{i:02d}" / "x.JPEG")
    if backend == "ffcv":
        from datamodules.ffcv_write import prepare_ffcv

        prepare_ffcv(str(root), compress_probability=0, workers=1)

    class World:  # the trainer attributes a DataModule reads: rank 1 of 2 on the CPU
        global_rank, world_size = 1, 2
        strategy = type("S", (), {"root_device": torch.device("cpu")})()

    def loader(state: dict | None = None):
        dm = ImageNetDataModule(str(root), batch_size=4, num_workers=1, crop_size=32, val_resize_size=36,
                                backend=backend, dali={"device": "cpu"})
        dm.trainer = World()
        dm.setup("fit")
        if state:
            dm.load_state_dict(state)
        return dm, dm.train_dataloader()

    def begin(loader_):  # Lightning: iter() first, set_epoch() after it on a resume, then the batches
        it = iter(loader_)
        (loader_.sampler if backend != "torchvision" else loader_.batch_sampler.sampler).set_epoch(1)
        return it

    def ids(batches) -> list[list[int]]:
        return [[int(v) for v in y] for _, y in batches]

    dm, full = loader()
    assert len(full) == 6
    uninterrupted = [(x.clone(), y.tolist()) for x, y in begin(full)]
    assert sorted(sum(ids(uninterrupted), [])) == sorted(rank_order(24, 0, 1, 1, 2).tolist())  # epoch 1, not 0

    dm, first = loader()
    it = begin(first)
    head = [(x.clone(), y.tolist()) for x, y in (next(it) for _ in range(2))]
    state = dm.state_dict()
    assert state["train_position"] == {"epoch": 1, "samples": 8, "world_size": 2, "batch_size": 2, "repeats": 1}
    del it
    dm, second = loader(state)
    assert len(second) == 6  # Lightning counts a resumed epoch's batches from its start
    it = begin(second)
    head += [(x.clone(), y.tolist()) for x, y in (next(it) for _ in range(1))]
    state = dm.state_dict()  # interrupted again in the same epoch, from the resumed pass
    assert state["train_position"]["samples"] == 12
    del it
    dm, third = loader(state)
    resumed = head + [(x.clone(), y.tolist()) for x, y in begin(third)]
    assert ids(resumed) == ids(uninterrupted)
    # The same crops too: torchvision's are f(seed, epoch, index); DALI's pipeline state is in the checkpoint.
    # FFCV draws the rest of the epoch's crops anew (README).
    if backend != "ffcv":
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, uninterrupted))
    if backend == "dali":  # a pipeline state of another pass is refused, not applied: fresh crops, same samples
        state["dali_pipelines"][1]["list_start"] = 4
        dm, fourth = loader(state)
        assert ids(begin(fourth)) == ids(uninterrupted)[3:]
    assert dm.state_dict()["train_position"]["samples"] == 24  # the whole epoch, both ranks


def test_crops_are_a_function_of_seed_epoch_and_index_not_of_the_workers(demo_root):
    def crops(workers: int) -> list[torch.Tensor]:
        dm = ImageNetDataModule(str(demo_root), batch_size=8, num_workers=workers, crop_size=32, val_resize_size=36)
        dm.setup("fit")
        loader = dm.train_dataloader()
        it = iter(loader)
        loader.batch_sampler.sampler.set_epoch(3)
        return [x for x, _ in it]

    zero, one, three = crops(0), crops(1), crops(3)
    assert len(zero) == 9 and all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(zero, one, three))
    # The draw itself depends on the key: another epoch or index crops differently, the same key alike.
    dataset = ImageNetDataModule(str(demo_root), crop_size=32, val_resize_size=36)
    dataset.setup("fit")
    train: ImageFolderDataset = dataset.train_set
    assert torch.equal(train[(5, 1)][0], train[(5, 1)][0])
    assert not torch.equal(train[(5, 1)][0], train[(5, 2)][0])
    assert sample_seed(0, 1, 5) != sample_seed(0, 1, 6) and sample_seed(0, 1, 5) != sample_seed(1, 1, 5)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    train[(5, 1)]  # the main process's generator is left as it was (num_workers 0)
    assert torch.equal(torch.rand(1), before)


# Runs COMMAND... in the background and sends it SIG as soon as it has a handler for SIG (the SigCgt mask of
# /proc/PID/status, read once it runs the command: between fork and exec the status is the parent's); exits with its
# status, or 99 when none came within ~60 s. Timed by a process of its own: a test process that a busy thread holds
# off (seen twice in `make test`: a minute) would signal a run long past its start-up.
SIGNAL_WHEN_HANDLED = r"""
sig=$1; shift
"$@" & pid=$!
for i in $(seq 6000); do
  if grep -qF "$1" /proc/$pid/cmdline 2>/dev/null; then
    mask=$(awk '/^SigCgt/ {print $2}' /proc/$pid/status 2>/dev/null)
    if [ -n "$mask" ] && (( (16#$mask >> (sig - 1)) & 1 )); then kill -$sig $pid; wait $pid; exit $?; fi
  fi
  sleep 0.01
done
echo "no start-up handler within 60 s"; kill -KILL $pid; exit 99
"""


@pytest.mark.parametrize("signal_name, code", [("SIGUSR1", REQUEUE_EXIT), ("SIGTERM", 128 + signal.SIGTERM)])
def test_a_signal_during_start_up_ends_the_job_cleanly(demo_root, tmp_path, signal_name, code):
    """SLURM's SIGUSR1 (time limit) or SIGTERM (preemption) while `resnet fit` still imports torch: no exit 138,
    no traceback; SIGUSR1 asks the job script to requeue (exit 75: srun ends any rank still waiting), SIGTERM exits
    143 (SLURM requeues a preempted job)."""
    request = tmp_path / "requeue.request"
    env = {**os.environ, **SLURM_ONE_TASK, "RESNET_REQUEUE_FILE": str(request), "PYTHONWARNINGS": "ignore"}
    signum = getattr(signal, signal_name)
    proc = subprocess.Popen(  # signalled once its start-up handler is in: torch still imports
        ["bash", "-c", SIGNAL_WHEN_HANDLED, "signal-when-handled", str(int(signum)), RESNET,
         *tiny_fit_args(demo_root, tmp_path / "run")], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == code, out[-3000:]
    assert "Seed set to" not in out, out[-3000:]  # it ended during the imports, before the command line was read
    assert "Traceback" not in out, out[-3000:]
    if signal_name == "SIGUSR1":
        assert request.read_text().strip() == NOTHING_NEW
        assert "the job script requeues the job" in out
    else:
        assert f"SIGTERM: {NOTHING_NEW}" in out and not request.exists()


def test_a_start_up_signal_whose_exception_is_lost_still_ends_the_job(demo_root, tmp_path):
    """A handler that runs inside a finalizer (garbage collection during the imports) has its exception printed and
    dropped by Python: the run must still end (exit 143), not train (seen once under load)."""
    script = f"""
import os, signal, sys
from train import signals
sys.argv = {["resnet", *tiny_fit_args(demo_root, tmp_path / "run")]!r}
install = signals.install_startup_handlers
class Collected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here: the handler's Preempted is dropped
def install_then_signal():
    install()
    Collected()
signals.install_startup_handlers = install_then_signal
signals.main()
"""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "Exception ignored" in proc.stderr  # the mechanism: Python dropped the handler's exception
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"SIGTERM: {NOTHING_NEW}" in proc.stdout and not (tmp_path / "run" / "checkpoints").exists()


def test_no_silent_starts(demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        build_cli(["fit", *tiny_fit_args(demo_root, run, "--ckpt_path", "last")[1:]])
    assert exit_.value.code == 2
    assert f"--ckpt_path last: nothing to resume in {run}: it holds no checkpoint (logs)" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        build_cli(["validate", *tiny_fit_args(demo_root, run)[1:]])
    assert "validate: no weights given" in capsys.readouterr().err
    build_cli(["validate", *tiny_fit_args(demo_root, run, "--random_weights", "true",
                                         "--trainer.limit_val_batches", "1")[1:]])  # on purpose: allowed


def test_unreadable_checkpoints_are_skipped_with_their_name(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 9}, ckpts / "last.ckpt")
    torch.save({"global_step": 12}, tmp_path / "hpc_ckpt_1.ckpt")
    (ckpts / "periodic.ckpt").write_bytes((tmp_path / "hpc_ckpt_1.ckpt").read_bytes()[:-100])  # a half write
    with pytest.warns(UserWarning, match=rf"{ckpts / 'periodic.ckpt'}: skipped, not a readable checkpoint"):
        assert newest_checkpoint(tmp_path, ckpts) == tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 14}, ckpts / "periodic.ckpt")
    assert resume_path(tmp_path, ckpts, "last") == str(ckpts / "periodic.ckpt")  # the highest step, of any kind
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    (ckpts / "periodic.ckpt").write_bytes(b"")
    (ckpts / "last.ckpt").write_bytes(b"PK")
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match=r"are all unreadable"):
        resume_path(tmp_path, ckpts, "last")


def test_a_fresh_run_gets_a_new_wandb_id_and_a_resumed_one_keeps_its_own(tmp_path, monkeypatch):
    from train.wandb_logging import run_identity

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = run_identity(tmp_path, "resnet50", resumed=False)[0]
    assert run_identity(tmp_path, "resnet50", resumed=True)[0] == first
    fresh = run_identity(tmp_path, "resnet50", resumed=False)[0]  # checkpoints removed, a new run here
    assert fresh != first and (tmp_path / "wandb_run_id").read_text().strip() == fresh
