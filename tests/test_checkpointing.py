"""Checkpoints that survive: atomic writes, a last.ckpt that is the latest epoch, the requeue callback's input
checks. The SLURM signal -> save -> requeue -> resume path runs for real in tests/test_slurm.py."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from tests.conftest import run_resnet, small_disk, tiny_fit_args
from train.checkpointing import AtomicCheckpointIO, CheckpointSpaceError, hpc_checkpoints, resume_path
from train.requeue import RequeueOnSignal


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # what a failure halfway through torch.save looks like


def test_atomic_write_keeps_the_previous_checkpoint_on_failure(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no .partial left behind


def test_hpc_checkpoints_sorted_by_number_not_name(tmp_path):
    for n in (10, 2, 1):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt"]


def test_requeue_signal_must_be_a_user_signal():
    assert RequeueOnSignal("SIGUSR2").signum.name == "SIGUSR2"
    with pytest.raises(ValueError, match="expected SIGUSR1 or SIGUSR2"):
        RequeueOnSignal("SIGTERM")


def test_last_ckpt_is_the_latest_epoch_even_without_a_top_k_save(demo_root, tmp_path):
    # save_top_k 0: no epoch makes a top-k save, the case where Lightning 2.6's save_last writes nothing.
    run_dir = tmp_path / "run"
    run_resnet(*tiny_fit_args(demo_root, run_dir, "--trainer.max_epochs", "2", "--checkpoint.save_top_k", "0"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 18 and last["epoch"] == 1


def test_resume_path_prefers_the_newest_checkpoint_of_any_kind_after_a_requeue_or_restart(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    save = lambda path, step: torch.save({"global_step": step}, path)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_path(tmp_path, ckpts) is None  # a fresh run
    ckpts.mkdir()
    save(ckpts / "last.ckpt", 9)
    with pytest.raises(FileExistsError, match="last.ckpt exists: resume that run with --ckpt_path last"):
        resume_path(tmp_path, ckpts)  # a fresh fit would overwrite that run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued after a node failure: no hpc_ckpt_N.ckpt
    assert resume_path(tmp_path, ckpts) == str(ckpts / "last.ckpt")
    save(tmp_path / "hpc_ckpt_1.ckpt", 3)
    save(tmp_path / "hpc_ckpt_2.ckpt", 12)
    assert resume_path(tmp_path, ckpts) == str(tmp_path / "hpc_ckpt_2.ckpt")
    # The resumed run went on and saved a periodic checkpoint; then a rank was killed (no signal).
    save(ckpts / "periodic.ckpt", 15)
    assert resume_path(tmp_path, ckpts) == str(ckpts / "periodic.ckpt")
    # The same step twice (an epoch-end last.ckpt and a requeue checkpoint after it): the newer file.
    save(ckpts / "last.ckpt", 15)
    os.utime(ckpts / "last.ckpt", (time.time() + 60, time.time() + 60))
    assert resume_path(tmp_path, ckpts) == str(ckpts / "last.ckpt")
    assert resume_path(tmp_path, ckpts, "elsewhere.ckpt") == "elsewhere.ckpt"


def test_the_command_line_writes_checkpoints_atomically(demo_root, tmp_path):
    from train.cli import build_cli

    cli = build_cli(tiny_fit_args(demo_root, tmp_path / "run")[1:], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    # A real ENOSPC from the kernel: the partial file's name points at /dev/full, whose every write fails so.
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    (tmp_path / ".last.ckpt.partial").symlink_to("/dev/full")
    with pytest.raises(CheckpointSpaceError, match=rf"no room to write checkpoint {path} \(No space left on device: "
                                                   r"[\d,]+ MiB free there; the previous last.ckpt \(0.0 MiB\) is kept"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(2**20)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_fit_on_a_disk_that_fills_ends_with_one_line_naming_the_checkpoint(demo_root, tmp_path):
    # A 20 MiB file system for the checkpoints: a ResNet-18 checkpoint (~90 MB with SGD's momentum) fills it part-way,
    # where torch raises a RuntimeError over the ENOSPC.
    ckpts = tmp_path / "run" / "checkpoints"
    with small_disk(ckpts, "20m"):
        done = run_resnet(*tiny_fit_args(demo_root, tmp_path / "run", "--trainer.max_epochs", "1",
                                         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"),
                          expect_rc=1)
        assert re.search(rf"^resnet fit: error: no room to write checkpoint {ckpts}/(best|last)\.ckpt \(No space left "
                         rf"on device: 20 MiB free there\)\. Free space .* then resume the run: the same command with "
                         rf"--ckpt_path last \(the slurm/ scripts: RESNET_RUN_DIR={tmp_path / 'run'}\)$", done.stderr,
                         re.M), done.stderr
        assert "Traceback" not in done.stderr
        assert os.listdir(ckpts) == []  # no partial file left
    assert (tmp_path / "run/logs/version_0/metrics.csv").is_file()  # what the run wrote elsewhere is kept


@pytest.mark.slow
def test_two_ranks_on_a_full_disk_end_with_the_first_ranks_line(demo_root, tmp_path):
    # The second rank, started by the first's launcher, is ended with it: no traceback of its lost connection after
    # the message (it printed one and kept the job's log from ending on the cause).
    ckpts = tmp_path / "run" / "checkpoints"
    with small_disk(ckpts, "2m"):
        done = run_resnet(*tiny_fit_args(demo_root, tmp_path / "run", "--trainer.max_epochs", "1",
                                         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                                         "--trainer.devices", "2", "--trainer.strategy", "ddp"), expect_rc=1)
    assert done.stderr.strip().splitlines()[-1].startswith(f"resnet fit: error: no room to write checkpoint {ckpts}/")
    assert "[rank1]" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
