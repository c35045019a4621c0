"""Job signals from the first moment of `resnet fit`, before its heavy imports and the data scan (standard library
only): SLURM sends SIGUSR1 before a time limit (`#SBATCH --signal=SIGUSR1@300`) and SIGTERM on preemption, and a
job that is still importing torch or listing 1.28 M files must neither die of them (exit 138, no requeue) nor ignore
them. Until training starts there is nothing new to save: the signal ends the command at once, cleanly, and a SIGUSR1
requeues the job (`requeue`). From the first training step on, `train.requeue.RequeueOnSignal` takes over and
saves first."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

NOTHING_NEW = "nothing new to save: the signal came before training started"


class Requeued(BaseException):
    """Raised on every rank once the requeue checkpoint is saved (or before training started, with nothing to save):
    ends `fit` without validating or saving more. A BaseException, as KeyboardInterrupt: no `except Exception` on
    the way (a benchmark row, a logger) swallows it. Its message is the checkpoint the next start resumes from."""


class Preempted(BaseException):
    """Raised on every rank once the checkpoint is saved after a SIGTERM (SLURM preemption or `scancel`, `docker
    stop`, a node drain): ends `fit`; the process then exits 143 (128 + SIGTERM) without requeueing, which SLURM
    does itself for a preempted `--requeue` job."""


def in_slurm_job() -> bool:
    """A SLURM batch or srun step, as Lightning's SLURMEnvironment.detect() decides (not an interactive shell)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> Optional[str]:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for array tasks, else SLURM_JOB_ID; None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


_received: list[int] = []  # start-up signals, also kept here: see startup_signals()


def _before_training(signum: int, frame) -> None:
    _received.append(signum)
    if signum == signal.SIGTERM:
        raise Preempted(NOTHING_NEW)
    raise Requeued(NOTHING_NEW)


def install_startup_handlers() -> None:
    """SIGTERM (everywhere) and SIGUSR1 (in a SLURM job) end the command at once with Preempted / Requeued."""
    signal.signal(signal.SIGTERM, _before_training)
    if in_slurm_job():
        signal.signal(signal.SIGUSR1, _before_training)


def startup_signals() -> list[int]:
    """The signals the start-up handler received. Its exception can be lost: a handler that runs while Python
    executes a finalizer (garbage collection during the imports) has its exception printed and dropped, and the
    command would go on to train. RequeueOnSignal acts on these at set-up. Read once: a later fit in the same
    process (a benchmark loop, a notebook) starts without them."""
    received = list(_received)
    _received.clear()
    return received


def is_startup_handler(handler) -> bool:
    return handler is _before_training


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
        print(f"Saved {checkpoint}: the job script requeues the job ({request})" if checkpoint != NOTHING_NEW else
              f"Requeue ({NOTHING_NEW}): the job script requeues the job ({request})", flush=True)
        return
    job = slurm_job_id()
    if shutil.which("scontrol") is None:
        print(f"{checkpoint}; but there is no scontrol here (a container?) to requeue job {job} with",
              file=sys.stderr, flush=True)
        raise SystemExit(REQUEUE_EXIT)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        where = Path(checkpoint).parent if checkpoint != NOTHING_NEW else "the same run directory"
        raise SystemExit(
            f"scontrol requeue {job} failed: {done.stderr.strip()}. Resume in a new job with "
            f"--trainer.default_root_dir {where} (slurm/: RESNET_RUN_DIR={where})"
        )
    print(f"Requeued SLURM job {job}: it resumes from {checkpoint}", flush=True)


def ignore_job_signals() -> None:
    """A second SIGTERM or SIGUSR1 (srun forwarding SLURM's, a time limit after a requeue request) must not cut the
    save, the requeue request or the shutdown short."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def end_on_job_signal(exc: BaseException) -> None:
    """What every `resnet fit` process does after Requeued or Preempted reached the top: requeue (rank 0), then
    exit 0 (requeued) or 143 (preempted: SLURM requeues a preempted `--requeue` job itself). A requeue before
    training started is written by every rank (rank 0 may be the one held in a collective its peers left) and
    exits REQUEUE_EXIT, so that `srun --kill-on-bad-exit` ends ranks still waiting in one; the job script requeues."""
    ignore_job_signals()
    if isinstance(exc, Requeued):
        if str(exc) == NOTHING_NEW and os.environ.get("RESNET_REQUEUE_FILE"):
            Path(os.environ["RESNET_REQUEUE_FILE"]).write_text(NOTHING_NEW + "\n")
            if int(os.environ.get("SLURM_PROCID", "0")) == 0:
                print(f"Requeue ({NOTHING_NEW}): the job script requeues the job "
                      f"({os.environ['RESNET_REQUEUE_FILE']})", flush=True)
            sys.exit(REQUEUE_EXIT)
        requeue(str(exc))
        sys.exit(0)
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        if str(exc) == NOTHING_NEW:
            print(f"SIGTERM: {NOTHING_NEW}", flush=True)
        else:
            print(f"SIGTERM: saved {exc}; a later `resnet fit` in the same run directory resumes from it", flush=True)
    sys.exit(128 + signal.SIGTERM)


def main() -> None:
    """The `resnet` console script: the job-signal handlers first (for `fit`), then the command line."""
    if sys.argv[1:2] == ["fit"]:
        install_startup_handlers()
    try:
        try:
            from train.cli import main as cli_main  # torch, Lightning, ...: seconds on a cold shared file system
        except KeyboardInterrupt:  # Ctrl-C before the command started: nothing to save or clean up
            print("\nresnet: interrupted", file=sys.stderr)
            sys.exit(130)
        cli_main()
    except (Requeued, Preempted) as exc:
        end_on_job_signal(exc)
