"""Saving on SLURM's signals: `RequeueOnSignal` saves the run and ends `fit` on every rank at the same step on the
signal before a time limit (then requeues), on preemption (SIGTERM) and every `requeue.checkpoint_every_minutes`;
the ranks agree on the step through `AgreedFlags`. The files themselves: train/checkpointing.py."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from train.checkpointing import HPC_CKPT, PERIODIC, hpc_checkpoints
from train.signals import NOTHING_NEW, Preempted, Requeued, ignore_job_signals, is_startup_handler, startup_signals, slurm_job_id

log = logging.getLogger(__name__)


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
