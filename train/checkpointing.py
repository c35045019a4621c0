"""Checkpoints that survive: best.ckpt and a last.ckpt that is really the latest, written atomically; saved on
SLURM's signal before a time limit or preemption, then requeue and resume."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `x.ckpt` as `.x.ckpt.partial`, fsyncs it, then renames it: a job killed mid-write (time limit,
    preemption, node failure) leaves the previous `x.ckpt` intact instead of a truncated one."""

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
        finally:
            partial.unlink(missing_ok=True)  # gone after the rename; a failed write leaves no debris


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is the latest epoch. Since Lightning 2.6, `save_last=True` writes
    last.ckpt only when a top-k checkpoint is saved at the same step: with `monitor=val/acc1, save_top_k=1`, an
    epoch that does not improve val/acc1 leaves last.ckpt behind, and `--ckpt_path last` would silently drop it."""

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


def slurm_job_id() -> Optional[str]:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for array tasks, else SLURM_JOB_ID; None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def hpc_checkpoints(root: Path) -> list[Path]:
    """Requeue checkpoints in a run directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("hpc_ckpt_*.ckpt") if (m := HPC_CKPT.search(p.name))]
    return [p for _, p in sorted(found)]


def resume_path(root: Path, last: Path) -> Optional[str]:
    """Where a `fit` without --ckpt_path starts: the newest requeue checkpoint (hpc_ckpt_N.ckpt, saved on SLURM's
    signal) if any, unless last.ckpt was saved after it; last.ckpt when SLURM restarted the job without one (node failure); otherwise a fresh start,
    refused over an existing run (it would replace its best.ckpt and last.ckpt)."""
    if requeued := hpc_checkpoints(root):
        # The run may have gone on after that requeue and saved last.ckpt since: then a restart (node failure,
        # SIGTERM preemption) must not go back to the requeue checkpoint.
        newest = requeued[-1]
        if last.exists() and last.stat().st_mtime > newest.stat().st_mtime:
            return str(last)
        return str(newest)
    if last.exists() and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return str(last)
    if last.exists():
        raise FileExistsError(
            f"{last} exists: resume that run with --ckpt_path last, or start a new one in another "
            "--trainer.default_root_dir"
        )
    return None


def close_process_group() -> None:
    """Left to interpreter exit, a gloo process group sometimes aborts a rank ("terminate called without an active
    exception") while its peers still shut down, failing the SLURM job after a successful fit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Requeued(BaseException):
    """Raised on every rank once the requeue checkpoint is saved: ends `fit` without validating or saving more.
    A BaseException, as KeyboardInterrupt: no `except Exception` on the way (a benchmark row, a logger) swallows it."""


class Preempted(BaseException):
    """Raised on every rank once the checkpoint is saved after a SIGTERM (SLURM preemption or `scancel`, `docker
    stop`, a node drain): ends `fit`; the process then exits 143 (128 + SIGTERM) without requeueing, which SLURM
    does itself for a preempted `--requeue` job."""


USR1, TERM = 0, 1  # positions in the flags the ranks agree on


class AgreedFlags:
    """Per-rank signal flags that every rank acts on at the same optimizer step, without a blocking collective or a
    GPU synchronisation on any step. Each call starts an asynchronous all-reduce (max) of this rank's flags over a
    gloo group of CPU tensors and returns the result of the one started `lag` calls earlier: by then it has long
    finished, because DDP's gradient all-reduce keeps the ranks within a step of each other. Every rank makes the
    same calls, so every rank reads the same answer at the same step. On one process the flags are returned at once.
    """

    def __init__(self, world_size: int, lag: int = 2) -> None:
        """
        Args:
            world_size: processes of the run; 1 = no collective at all.
            lag: calls between starting an all-reduce and reading it (the delay, in optimizer steps, before a
                signal is acted on).
        """
        import torch.distributed as dist

        self.lag = lag
        # A group of its own: these small CPU all-reduces never queue behind NCCL's gradient buckets, nor they behind these.
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._pending: deque[tuple[Any, torch.Tensor]] = deque()

    def poll(self, flags: list[bool]) -> list[bool]:
        """This rank's flags in; the flags of all ranks (any rank set = set) as of `lag` calls ago out."""
        if self.group is None:
            return flags
        import torch.distributed as dist

        local = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self._pending.append((dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group, async_op=True), local))
        if len(self._pending) <= self.lag:
            return [False] * len(flags)
        work, agreed = self._pending.popleft()
        work.wait()
        return [bool(v) for v in agreed.tolist()]

    def drain(self) -> None:
        """Wait for the all-reduces still in flight (the same number on every rank) before the group goes away."""
        while self._pending:
            self._pending.popleft()[0].wait()


class RequeueOnSignal(Callback):
    """Saves the run and ends `fit` on every rank at the same optimizer step when a job signal arrives:
    - SIGUSR1 under SLURM (`#SBATCH --signal=SIGUSR1@<s>`, sent <s> seconds before the time limit, or
      `scancel --signal=USR1 JOB`): `hpc_ckpt_N.ckpt` in the run directory, then `Requeued`, and `resnet` requeues
      the job (see `requeue`); the requeued job keeps its id and run directory and Lightning resumes from the newest
      `hpc_ckpt_N.ckpt` there at the same global step (a mid-epoch resume replays that epoch's data order from its
      start: the loaders keep no position).
    - SIGTERM, everywhere (SLURM preemption and `scancel`, `docker stop`): the same checkpoint, then `Preempted`,
      and `resnet` exits 143. Lightning's own SIGTERM handling is replaced: it broadcasts a tensor from rank 0 on
      every training step (a collective and a GPU synchronisation per step) and acts on the flag per rank.

    The handlers only set flags. Saving inside a handler, as Lightning's own SLURM handler does, can run between two
    collectives of a DDP step or halfway through an optimizer step; here the ranks agree on the flags through
    `AgreedFlags` (an asynchronous all-reduce read `lag` steps later) and save at the same, consistent point, a few
    steps after the signal (well within SLURM's warning time or grace period)."""

    def __init__(self, signal_name: str = "SIGUSR1", lag_steps: int = 2) -> None:
        """
        Args:
            signal_name: the signal of `#SBATCH --signal=<name>@<seconds>` (no `B:`, so that srun's tasks get it).
            lag_steps: optimizer steps between a signal and the save (the ranks' asynchronous agreement).
        """
        if not hasattr(signal, signal_name) or signal_name in ("SIGTERM", "SIGINT", "SIGKILL"):
            raise ValueError(f"requeue.signal_name={signal_name!r}: expected SIGUSR1 or SIGUSR2")
        if lag_steps < 1:
            raise ValueError(f"requeue.lag_steps={lag_steps}: expected 1 or more")
        self.signum, self.lag_steps = getattr(signal, signal_name), lag_steps
        self._flags = [False, False]  # USR1, TERM
        self._active = False  # within fit: the handlers set flags; otherwise they hand the signal on
        self._agreed: Optional[AgreedFlags] = None
        self._previous: dict[int, Any] = {}

    def _install(self, signum: int, flag: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook's worker thread)
        self._previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, functools.partial(self._on_signal, flag))

    def _on_signal(self, flag: int, signum: int, frame) -> None:
        if self._active:
            self._flags[flag] = True
            return
        # After fit: Lightning's teardown after an exception re-installs the handlers it found (these). Act as the
        # handler from before fit would: the process must not become deaf to SIGTERM.
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._active = True
        # Installed before the Trainer installs its handlers (which then leaves SIGUSR1 to this one), and before
        # any loader worker starts (datamodules ignore both signals in workers: the main process decides).
        if SLURMEnvironment.detect():  # SIGUSR1 means "requeue" only in a SLURM job
            self._install(self.signum, USR1)
        self._install(signal.SIGTERM, TERM)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first hook after Lightning registered its handlers: its SIGTERM handler broadcasts from inside the
        # handler, a collective that the per-step broadcast dropped below no longer matches.
        self._install(signal.SIGTERM, TERM)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has composed its SIGTERM handler with this one by now: take SIGTERM back, and drop its per-step
        # rank-0 broadcast of the flag (a private method: Lightning has no public switch for it, 2.6).
        self._install(signal.SIGTERM, TERM)
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._agreed = AgreedFlags(trainer.world_size, self.lag_steps)
        if trainer.ckpt_path:
            restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
            rank_zero_info(
                f"Resumed from {trainer.ckpt_path} at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch} (SLURM job {slurm_job_id()}, restart {restarts})"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._agreed is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between optimizer steps the accumulated gradients would be lost
        usr1, term = self._agreed.poll(self._flags)
        if not (usr1 or term):
            return
        self._agreed.drain()
        root = Path(trainer.default_root_dir)
        older = hpc_checkpoints(root)
        number = int(HPC_CKPT.search(older[-1].name).group(1)) + 1 if older else 1
        path = root / f"hpc_ckpt_{number}.ckpt"
        trainer.save_checkpoint(path)  # rank 0 writes, every rank waits for it
        if trainer.is_global_zero:
            for old in older:  # one full model + optimizer each: keep only the newest
                old.unlink(missing_ok=True)
        name = "SIGTERM" if term else signal.Signals(self.signum).name
        rank_zero_info(f"Signal {name}: saved {path} at global step {trainer.global_step}")
        raise (Preempted if term else Requeued)(str(path))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._agreed is not None:
            self._agreed.drain()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run finished: last.ckpt is newer. A later `fit` here (more epochs) must not resume from this one.
        if trainer.is_global_zero:
            for old in hpc_checkpoints(Path(trainer.default_root_dir)):
                old.unlink(missing_ok=True)
                rank_zero_info(f"Removed {old}: the run finished, checkpoints/last.ckpt supersedes it")

    def _restore_handlers(self) -> None:
        self._active = False
        for signum, handler in self._previous.items():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signum, handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()  # after Lightning restored the ones it found (this callback's)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, (Requeued, Preempted)) and trainer.is_global_zero:
            for logger in trainer.loggers:  # flush W&B now: the requeue stops the job within seconds
                if isinstance(logger, WandbLogger) and logger._experiment is not None:
                    logger.experiment.finish()


REQUEUE_EXIT = 75  # EX_TEMPFAIL: saved, but no scontrol here to requeue with


def requeue(checkpoint: str) -> None:
    """After `fit` ended with `Requeued` and tore down: rank 0 has the job put back in the queue, last of all,
    because SLURM stops the job's processes as soon as it is requeued. The scripts in slurm/ set
    RESNET_REQUEUE_FILE: rank 0 writes it and every rank exits 0; the script requeues from the host after srun
    returns (a container has no scontrol or munge). Otherwise rank 0 runs `scontrol requeue` itself."""
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return
    if request := os.environ.get("RESNET_REQUEUE_FILE"):
        Path(request).write_text(checkpoint + "\n")
        print(f"Saved {checkpoint}: the job script requeues the job ({request})", flush=True)
        return
    job = slurm_job_id()
    if shutil.which("scontrol") is None:
        print(f"Saved {checkpoint}, but there is no scontrol here (a container?) to requeue job {job} with",
              file=sys.stderr, flush=True)
        raise SystemExit(REQUEUE_EXIT)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"scontrol requeue {job} failed: {done.stderr.strip()}. Resume from {checkpoint} in a new job with "
            f"--trainer.default_root_dir {Path(checkpoint).parent} (slurm/: RESNET_RUN_DIR={Path(checkpoint).parent})"
        )
    print(f"Requeued SLURM job {job}: it resumes from {checkpoint}", flush=True)
