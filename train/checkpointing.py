"""Checkpoints that survive: best.ckpt and a last.ckpt that is really the latest, written atomically; a restart
resumes from the newest valid one, at the exact position in the epoch's data order. Saving on SLURM's signals
(before a time limit, on preemption, every `requeue.checkpoint_every_minutes`): train/requeue.py."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from datamodules.prepare_io import disk_full

log = logging.getLogger(__name__)
HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")
PERIODIC = "periodic.ckpt"  # in the checkpoint folder, replaced every requeue.checkpoint_every_minutes


class CheckpointSpaceError(OSError):
    """A checkpoint did not fit: the file system (or the user's quota on it) is full. The previous file of that name
    is left as it was; the message names the path, the space left and the size of that previous file."""


def _space_error(path: Path, error: OSError) -> CheckpointSpaceError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    before = f"; the previous {path.name} ({path.stat().st_size / 2**20:,.1f} MiB) is kept" if path.exists() else ""
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return CheckpointSpaceError(
        error.errno, f"no room to write checkpoint {path} ({os.strerror(error.errno)}: {free}{before}). Free space "
        f"(or move the run's folder {run} and name the new one in --trainer.default_root_dir), then resume the run: "
        f"the same command with --ckpt_path last (the slurm/ scripts: RESNET_RUN_DIR={run})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `x.ckpt` as `.x.ckpt.partial`, fsyncs it, then renames it: a job killed mid-write (time limit,
    preemption, node failure) leaves the previous `x.ckpt` intact instead of a truncated one. A full file system or
    quota (ENOSPC, EDQUOT: on NFS and Lustre often only at fsync) raises CheckpointSpaceError, naming the path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) or storage_options is not None:  # object stores: their own semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except Exception as e:
            full = disk_full(e)  # torch raises a RuntimeError over it when the disk fills part-way
            if full is None:
                raise
            partial.unlink(missing_ok=True)  # before the free space is measured
            raise _space_error(path, full) from e
        finally:
            partial.unlink(missing_ok=True)  # gone after the rename; a failed write leaves no debris


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is the latest epoch. Since Lightning 2.6, `save_last=True` writes
    last.ckpt only when a top-k checkpoint is saved at the same step: with `monitor=val/acc1, save_top_k=1`, an
    epoch that does not improve val/acc1 leaves last.ckpt behind, and `--ckpt_path last` would silently drop it.

    It calls ModelCheckpoint's private helpers (when to save, whether this step saved, how last.ckpt is written),
    kept in step with Lightning 2.6. Two public ModelCheckpoints (best by val/acc1, and latest with no monitor) would
    do the same, but change the callback state key that checkpoints of running jobs hold: their best-model record
    (best_model_score) would be dropped on resume and best.ckpt overwritten by a worse epoch."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips when saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def hpc_checkpoints(root: Path) -> list[Path]:
    """Requeue checkpoints in a run directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("hpc_ckpt_*.ckpt") if (m := HPC_CKPT.search(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> Optional[tuple[int, float]]:
    """(global step, mtime) of a readable checkpoint; None, with a warning naming it, for a corrupt, truncated or
    unreadable file. Memory-mapped: the tensors are not read, a full-size checkpoint is checked in milliseconds."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(state["global_step"]), path.stat().st_mtime
    except Exception as e:  # any reason a file cannot be resumed from: skip it, say which and why
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rank_zero_warn(f"{path}: skipped, not a readable checkpoint ({why})")
        return None


def resume_candidates(root: Path, ckpt_dir: Path) -> list[Path]:
    """Every checkpoint a run can resume from: requeue (hpc_ckpt_N.ckpt), periodic and epoch-end (last.ckpt)."""
    return [*hpc_checkpoints(root), *(p for p in (ckpt_dir / PERIODIC, ckpt_dir / "last.ckpt") if p.is_file())]


def newest_checkpoint(root: Path, ckpt_dir: Path) -> Optional[Path]:
    """The readable checkpoint of the run with the highest global step (the newest file among equals)."""
    steps = {p: step for p in resume_candidates(root, ckpt_dir) if (step := checkpoint_step(p)) is not None}
    return max(steps, key=steps.get) if steps else None


def describe_folder(root: Path) -> str:
    """What a run directory holds, for error messages: its checkpoint files, else its entries."""
    if not root.is_dir():
        return "it does not exist"
    ckpts = sorted(str(p.relative_to(root)) for p in root.rglob("*.ckpt"))
    if ckpts:
        return f"its checkpoints ({', '.join(ckpts)}) are all unreadable"
    entries = sorted(p.name for p in root.iterdir())
    return f"it holds no checkpoint ({', '.join(entries[:8]) or 'it is empty'})"


def resume_path(root: Path, ckpt_dir: Path, ckpt_path: Optional[str] = None) -> Optional[str]:
    """The checkpoint `resnet fit` starts from.
    - `ckpt_path="last"`: the newest readable checkpoint of any kind (requeue, periodic, epoch end); an error naming
      the folder and what it holds when there is none.
    - another `ckpt_path`: that file.
    - None: a requeued or restarted job (a requeue checkpoint is there, or SLURM_RESTART_COUNT > 0 after a node
      failure or `scontrol requeue`) resumes from the newest readable checkpoint; a fresh start is refused over an
      existing run (it would replace its checkpoints); otherwise a fresh start (None)."""
    if ckpt_path not in (None, "last"):
        return ckpt_path
    newest = newest_checkpoint(root, ckpt_dir)
    if ckpt_path == "last":
        if newest is None:
            raise FileNotFoundError(f"--ckpt_path last: nothing to resume in {root}: {describe_folder(root)}")
        return str(newest)
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if newest is None and resume_candidates(root, ckpt_dir):  # never a silent fresh start over a run
        raise FileNotFoundError(f"{root}: nothing to resume: {describe_folder(root)}; move them away to start anew")
    if hpc_checkpoints(root) or restarted:
        return str(newest) if newest is not None else None
    if newest is not None or resume_candidates(root, ckpt_dir):
        raise FileExistsError(
            f"{newest or resume_candidates(root, ckpt_dir)[0]} exists: resume that run with --ckpt_path last, or start "
            "a new one in another --trainer.default_root_dir"
        )
    return None


def close_process_group() -> None:
    """Left to interpreter exit, a gloo process group sometimes aborts a rank ("terminate called without an active
    exception") while its peers still shut down, failing the SLURM job after a successful fit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
