"""Checkpoints that survive: best.ckpt and a last.ckpt that is really the latest, written atomically; saved on
SLURM's signal before a time limit, on preemption (SIGTERM) and every `requeue.checkpoint_every_minutes`; a restart
resumes from the newest valid one, at the exact position in the epoch's data order."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from train.signals import (  # noqa: F401  (re-exported: the names callers and tests know)
    NOTHING_NEW,
    Preempted,
    Requeued,
    ignore_job_signals,
    is_startup_handler,
    startup_signals,
    slurm_job_id,
)

log = logging.getLogger(__name__)
HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")
PERIODIC = "periodic.ckpt"  # in the checkpoint folder, replaced every requeue.checkpoint_every_minutes


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


USR1, TERM, PERIODIC_DUE = 0, 1, 2  # positions in the flags the ranks agree on


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
    """Saves the run and ends `fit` on every rank at the same optimizer step when a job signal arrives, and saves it
    every `checkpoint_every_minutes` of training:
    - SIGUSR1 under SLURM (`#SBATCH --signal=SIGUSR1@<s>`, sent <s> seconds before the time limit, or
      `scancel --signal=USR1 JOB`): `hpc_ckpt_N.ckpt` in the run directory, then `Requeued`, and `resnet` requeues
      the job (see `requeue`); the requeued job keeps its id and run directory and resumes from the newest
      checkpoint there at the same global step and the same position in the epoch's data order.
    - SIGTERM, everywhere (SLURM preemption with a GraceTime, `scancel`, `docker stop`): the same checkpoint, then
      `Preempted`, and `resnet` exits 143; SLURM requeues a preempted `--requeue` job itself. Lightning's own SIGTERM
      handling is replaced: it broadcasts a tensor from rank 0 on every training step (a collective and a GPU
      synchronisation per step) and acts on the flag per rank.
    - Periodic: `checkpoints/periodic.ckpt`, replaced atomically, for what no signal announces (a crash, a killed
      rank, a lost node): a restart loses at most this much training.
    - Before the first training step (set-up, data scan, checkpoint restore, sanity check) a signal ends `fit` at
      once: there is nothing new to save (see train/signals.py, which handles the imports before this callback).

    The handlers only set flags. Saving inside a handler, as Lightning's own SLURM handler does, can run between two
    collectives of a DDP step or halfway through an optimizer step; here the ranks agree on the flags through
    `AgreedFlags` (an asynchronous all-reduce read `lag` steps later) and save at the same, consistent point, a few
    steps after the signal (well within SLURM's warning time or grace period). A signal during validation is acted
    on at the next training step; one agreed on at an epoch's last batch, after that epoch's validation."""

    def __init__(self, signal_name: str = "SIGUSR1", lag_steps: int = 2,
                 checkpoint_every_minutes: Optional[float] = 30.0) -> None:
        """
        Args:
            signal_name: the signal of `#SBATCH --signal=<name>@<seconds>` (no `B:`, so that srun's tasks get it).
            lag_steps: optimizer steps between a signal and the save (the ranks' asynchronous agreement).
            checkpoint_every_minutes: minutes of training between periodic checkpoints (`checkpoints/periodic.ckpt`);
                None or 0 = none. A ResNet-50 checkpoint (weights, SGD momentum: ~200 MB) takes about a second to
                write (docs/BENCHMARKS.md): 30 minutes costs well under 0.1 % of the run.
        """
        if not hasattr(signal, signal_name) or signal_name in ("SIGTERM", "SIGINT", "SIGKILL"):
            raise ValueError(f"requeue.signal_name={signal_name!r}: expected SIGUSR1 or SIGUSR2")
        if lag_steps < 1:
            raise ValueError(f"requeue.lag_steps={lag_steps}: expected 1 or more")
        if checkpoint_every_minutes is not None and checkpoint_every_minutes < 0:
            raise ValueError(f"requeue.checkpoint_every_minutes={checkpoint_every_minutes}: expected > 0, or 0 for none")
        self.signum, self.lag_steps = getattr(signal, signal_name), lag_steps
        self.period_s = 60.0 * checkpoint_every_minutes if checkpoint_every_minutes else None
        self._flags = [False, False]  # USR1, TERM
        self._active = False  # within fit: the handlers act; otherwise they hand the signal on
        self._training = False  # from the first training step: flags; before it: end at once
        self._agreed: Optional[AgreedFlags] = None
        self._deferred: Optional[tuple[bool, bool, bool]] = None  # agreed at an epoch's last batch: acted on at its end
        self._previous: dict[int, Any] = {}
        self._last_save = 0.0
        self._world_size = 1

    def _install(self, signum: int, flag: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a notebook's worker thread)
        self._previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, functools.partial(self._on_signal, flag))

    def _on_signal(self, flag: int, signum: int, frame) -> None:
        if self._active and (self._training or self._world_size > 1):
            # Several ranks: never leave from inside a handler (a peer may be held in a collective); on_train_start
            # agrees on the flags before the first step.
            self._flags[flag] = True
            return
        if self._active:  # one process, before the first step: nothing new to save, leave now
            self._flags[flag] = True  # and at on_train_start, should this exception be lost (see startup_signals)
            raise (Preempted if flag == TERM else Requeued)(NOTHING_NEW)
        # After fit: Lightning's teardown after an exception re-installs the handlers it found (these). Act as the
        # handler from before fit would: the process must not become deaf to SIGTERM.
        handler = self._after_fit(signum)
        signal.signal(signum, handler)
        if handler is signal.SIG_DFL:
            signal.raise_signal(signum)

    def _after_fit(self, signum: int):
        """The handler once fit is over: the one from before fit, except the start-up one (train/signals.py), which
        would report a signal after training as one before it: SIGTERM then terminates, SIGUSR1 is ignored."""
        previous = self._previous.get(signum)
        if previous is None or is_startup_handler(previous):
            return signal.SIG_DFL if signum == signal.SIGTERM else signal.SIG_IGN
        return previous

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._active, self._training, self._world_size = True, False, trainer.world_size
        self._flags = [False, False]  # an earlier fit's in this process (a benchmark loop, a notebook) are over
        # Installed before the Trainer installs its handlers (which then leaves SIGUSR1 to this one), and before
        # any loader worker starts (datamodules ignore both signals in workers: the main process decides).
        if SLURMEnvironment.detect():  # SIGUSR1 means "requeue" only in a SLURM job
            self._install(self.signum, USR1)
        self._install(signal.SIGTERM, TERM)
        for signum in startup_signals():  # received during start-up, its exception lost: act on it now
            self._flags[TERM if signum == signal.SIGTERM else USR1] = True
        if self._world_size == 1 and any(self._flags):
            raise (Preempted if self._flags[TERM] else Requeued)(NOTHING_NEW)

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
        usr1, term = self._flags
        if trainer.world_size > 1:  # a signal during set-up: every rank leaves here, together (one collective each)
            usr1 = trainer.strategy.reduce_boolean_decision(usr1, all=False)
            term = trainer.strategy.reduce_boolean_decision(term, all=False)
        if usr1 or term:
            raise (Preempted if term else Requeued)(NOTHING_NEW)
        self._training, self._last_save = True, time.monotonic()
        if trainer.ckpt_path:
            restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
            rank_zero_info(
                f"Resumed from {trainer.ckpt_path} at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch} (SLURM job {slurm_job_id()}, restart {restarts})"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._agreed is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # between optimizer steps the accumulated gradients would be lost
        due = self.period_s is not None and time.monotonic() - self._last_save >= self.period_s
        usr1, term, periodic = self._agreed.poll([*self._flags, due])
        if not (usr1 or term or periodic):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: after its validation and epoch-end checkpoint (on_train_epoch_end). Lightning
            # resumes a checkpoint of the last batch in the next epoch: that epoch's validation would be lost.
            self._deferred = (usr1, term, periodic)
            return
        self._act(trainer, usr1, term, periodic)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred is not None:
            (usr1, term, periodic), self._deferred = self._deferred, None
            self._act(trainer, usr1, term, periodic)

    def _act(self, trainer: pl.Trainer, usr1: bool, term: bool, periodic: bool) -> None:
        if term or usr1:
            self._agreed.drain()
            path = self._save_requeue_checkpoint(trainer)
            name = "SIGTERM" if term else signal.Signals(self.signum).name
            rank_zero_info(f"Signal {name}: saved {path} at global step {trainer.global_step}")
            raise (Preempted if term else Requeued)(str(path))
        path = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints") / PERIODIC
        start = time.perf_counter()
        trainer.save_checkpoint(path)  # rank 0 writes (atomically), every rank waits for it
        self._last_save = time.monotonic()
        rank_zero_info(f"Periodic checkpoint {path} at global step {trainer.global_step} "
                       f"({time.perf_counter() - start:.1f} s)")

    @staticmethod
    def _save_requeue_checkpoint(trainer: pl.Trainer) -> Path:
        root = Path(trainer.default_root_dir)
        older = hpc_checkpoints(root)
        number = int(HPC_CKPT.search(older[-1].name).group(1)) + 1 if older else 1
        path = root / f"hpc_ckpt_{number}.ckpt"
        trainer.save_checkpoint(path)  # rank 0 writes, every rank waits for it
        if trainer.is_global_zero:
            for old in older:  # one full model + optimizer each: keep only the newest
                old.unlink(missing_ok=True)
        return path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._agreed is not None:
            self._agreed.drain()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run finished: last.ckpt is newer. A later `fit` here (more epochs) resumes from it, not from these.
        if trainer.is_global_zero:
            ckpt_dir = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
            for old in [*hpc_checkpoints(Path(trainer.default_root_dir)), ckpt_dir / PERIODIC]:
                if old.exists():
                    old.unlink()
                    rank_zero_info(f"Removed {old}: the run finished, checkpoints/last.ckpt supersedes it")

    def _restore_handlers(self) -> None:
        self._active = self._training = False
        for signum in self._previous:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, self._after_fit(signum))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()  # after Lightning restored the ones it found (this callback's)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, (Requeued, Preempted)):
            ignore_job_signals()  # a second signal must not cut the W&B flush or the exit short
        if isinstance(exception, (Requeued, Preempted)) and trainer.is_global_zero:
            for logger in trainer.loggers:  # flush W&B now: the requeue stops the job within seconds
                if hasattr(logger, "finish"):  # WandbRunLogger: never raises (its service may be gone already)
                    logger.finish()
                elif isinstance(logger, WandbLogger) and logger._experiment is not None:
                    try:
                        logger.experiment.finish()
                    except Exception as e:  # a dead W&B service must not hide the saved checkpoint
                        rank_zero_warn(f"W&B: closing the run failed ({e})")
