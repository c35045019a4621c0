"""Callbacks the command line adds to every run: config and commit in checkpoints (and the W&B run config), throughput
(images/s, loader wait, GPU memory, epoch time), the report."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from train.model import is_log_step
from train.wandb_logging import upload_config

REPO = Path(__file__).resolve().parent.parent
REPORT_KEYS = ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5")


def git_commit() -> str:
    """HEAD of the checkout this code runs from, `+dirty` when it has uncommitted changes; outside git (an installed
    copy, the Docker image) $RESNET_GIT_COMMIT, which docker/build.sh bakes in, else `unknown`."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        commit = run("rev-parse", "HEAD").stdout.strip()
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RESNET_GIT_COMMIT") or "unknown"


class SaveConfigAndCommit(SaveConfigCallback):
    """Prints the resolved config at start, writes it to the run's log folder, and stores it with the git commit
    inside every checkpoint (`checkpoint["config"]`, `checkpoint["git_commit"]`)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Once per run: the config and the commit the run started from (not two git calls per checkpoint).
        self._run_info = {"config": self.parser.dump(self.config, skip_none=False), "git_commit": git_commit()}
        if not self.already_saved and trainer.is_global_zero:
            Console(stderr=True).print(Syntax(self._run_info["config"], "yaml", theme="ansi_dark"))
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Rank 0, once per run: a W&B run gets the same config, to filter and group runs by any key.
        upload_config(trainer, yaml.safe_load(self._run_info["config"]), self._run_info["git_commit"])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint.update(self._run_info)


class ImagesPerSecond(Callback):
    """Training throughput and what limits it, logged on the log steps (`trainer.log_every_n_steps`) only:
    - `train/images_per_sec`: images of all ranks per second over the last `window` batches (training loaders
      drop the last partial batch, so every rank steps with the same batch). On CUDA the window is timed by CUDA
      events recorded after each step and read on the log steps: no step waits for the GPU to measure it;
    - `train/loader_wait_share`: the fraction of that time rank 0's host waited for its next batch (loading, the copy
      to the device, normalisation); near 0 when the loader keeps up (the host runs ahead of the GPU otherwise);
    - `train/gpu_mem_peak_gib`: on CUDA, the most memory rank 0's tensors have held since the epoch started;
    - `train/epoch_time_s` (per epoch): wall time of the epoch, its validation included.
    The window restarts each epoch so that validation and loader start-up are not counted."""

    def __init__(self, window: int = 20):
        """
        Args:
            window: training batches averaged over.
        """
        self.window = window
        self._ends: deque[float] = deque(maxlen=window + 1)  # host clock after each step (perf_counter seconds)
        self._events: deque[torch.cuda.Event] = deque(maxlen=window + 1)  # CUDA: the same moments on the GPU's stream
        self._waits: deque[float] = deque(maxlen=window)
        self._epoch_start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()  # a mid-epoch resume skips on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ends.clear()
        self._events.clear()
        self._waits.clear()
        self._epoch_start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._ends:  # the batch has been fetched and moved to the device since the last step ended
            self._waits.append(time.perf_counter() - self._ends[-1])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._ends.append(time.perf_counter())
        cuda = pl_module.device.type == "cuda"
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # queued behind this step's kernels; costs the host nothing
            self._events.append(event)
        if len(self._ends) < 2 or not is_log_step(trainer, trainer.global_step, batch_idx):
            return
        host_seconds = self._ends[-1] - self._ends[0]  # the last len(_waits) batches, waits included
        if cuda:
            self._events[-1].synchronize()  # this step's kernels: the one wait, on log steps only
            seconds = self._events[0].elapsed_time(self._events[-1]) / 1000
        else:
            seconds = host_seconds
        images = (len(self._ends) - 1) * batch[0].size(0) * trainer.world_size
        pl_module.log("train/images_per_sec", images / seconds, on_step=True, on_epoch=False)
        pl_module.log("train/loader_wait_share", sum(self._waits) / host_seconds, on_step=True, on_epoch=False)
        if cuda:
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/gpu_mem_peak_gib", peak, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start
        # The slowest rank's time (one all-reduce per epoch).
        pl_module.log("train/epoch_time_s", seconds, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


class ValidationEpochs(Callback):
    """Validation at epochs `first`, `first + every`, `first + 2 every`, ... (1-based) and at the last epoch only:
    MLPerf's evaluation schedule (every 4 epochs, the first after 1 to 4; NVIDIA's: 3, 7, ..., 35 of 37).
    Lightning's `trainer.check_val_every_n_epoch` has no offset: this sets it before each epoch, to 1 on the epochs
    due and to a count no epoch reaches on the others. Used by configs/recipes/mlperf_r50.yaml."""

    def __init__(self, first: int = 1, every: int = 1):
        """
        Args:
            first: the first epoch (1-based) validated.
            every: epochs between validations from there.
        """
        if first < 1 or every < 1:
            raise ValueError(f"ValidationEpochs(first={first}, every={every}): expected both >= 1")
        self.first, self.every = first, every

    def due(self, epoch: int, max_epochs: int) -> bool:
        """Whether 1-based `epoch` of `max_epochs` is validated."""
        return epoch == max_epochs or (epoch >= self.first and (epoch - self.first) % self.every == 0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.due(trainer.current_epoch + 1, trainer.max_epochs)
        trainer.check_val_every_n_epoch = 1 if due else 2**31 - 1


class TrainingReport(Callback):
    """Keeps one row per epoch (epoch, lr, wall time, losses, accuracies; kept across resumes) and at the end of
    fit writes `history.csv` and `curves.png` into the run's log folder and prints the table.

    Time to accuracy: the first epoch whose validation reaches each of `time_to_accuracy` (val/acc1) is logged to
    every logger (CSV, W&B) as `time_to_acc1_<percent>/epoch` and `time_to_acc1_<percent>/hours`: the wall time of
    the epochs so far (training and validation; start-up and time lost to interruptions not counted), and printed
    in the report."""

    def __init__(self, time_to_accuracy: tuple[float, ...] = (0.70, 0.75, 0.759)) -> None:
        """
        Args:
            time_to_accuracy: val/acc1 thresholds (fractions; 0.759 is MLPerf's ResNet-50 target).
        """
        if any(not 0 < t <= 1 for t in time_to_accuracy):
            raise ValueError(f"report.time_to_accuracy={list(time_to_accuracy)}: expected fractions in (0, 1]")
        self.thresholds = tuple(sorted(time_to_accuracy))
        self.history: list[dict[str, float]] = []
        self._t0, self._lr, self._validated = 0.0, 0.0, False
        self._resumed_epoch_s = 0.0  # of an epoch interrupted part-way, from the checkpoint

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = not trainer.sanity_checking
        if trainer.state.fn == "validate" and trainer.is_global_zero:  # fit's table shows percents: so does validate
            m = trainer.callback_metrics
            shown = [f"{k} {100 * float(m[k]):.2f}%" for k in ("val/acc1", "val/acc5") if k in m]
            shown += [f"val/loss {float(m['val/loss']):.4f}"] if "val/loss" in m else []
            shown += [f"{int(m['val/images'])} images"] if "val/images" in m else []
            Console().print("validate: " + ", ".join(shown), highlight=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A mid-epoch resume skips on_train_epoch_start: the epoch's time before the interruption counts too.
        self._t0 = time.perf_counter() - self._resumed_epoch_s
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._validated = time.perf_counter(), False
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the lr of the epoch's first step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "epoch_s": time.perf_counter() - self._t0}
        row["lr"] = self._lr
        for key in REPORT_KEYS:
            if key.startswith("val/") and not self._validated:
                continue  # callback_metrics still hold an earlier epoch's validation
            value = m.get(f"{key}_epoch", m.get(key))
            if value is not None:
                row[key] = float(value)
        self.history.append(row)
        for threshold, reached in self.time_to_accuracy().items():
            if reached["epoch"] == trainer.current_epoch + 1:  # first reached in this epoch
                name = f"time_to_acc1_{100 * threshold:g}"
                pl_module.log(f"{name}/epoch", float(reached["epoch"]), on_step=False, on_epoch=True)
                pl_module.log(f"{name}/hours", reached["hours"], on_step=False, on_epoch=True)

    def time_to_accuracy(self) -> dict[float, dict[str, float]]:
        """{threshold: {"epoch": 1-based epoch, "hours": wall time of the epochs up to it}} of the thresholds reached."""
        reached: dict[float, dict[str, float]] = {}
        seconds = 0.0
        for row in self.history:
            seconds += row["epoch_s"]
            for t in self.thresholds:
                if t not in reached and row.get("val/acc1", -1.0) >= t:
                    reached[t] = {"epoch": row["epoch"] + 1, "hours": seconds / 3600}
        return reached

    def state_dict(self) -> dict[str, Any]:
        # The running epoch's seconds so far: a mid-epoch checkpoint resumes the clock there (an epoch-end one
        # starts a new epoch, whose on_train_epoch_start resets it).
        return {"history": self.history, "epoch_s": time.perf_counter() - self._t0 if self._t0 else 0.0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._resumed_epoch_s = float(state_dict.get("epoch_s", 0.0))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if not self.history or not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        with open(out / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        plot_curves(self.history, out / "curves.png")
        print_history(self.history, out)
        for t in self.thresholds:
            reached = self.time_to_accuracy().get(t)
            Console().print(f"val/acc1 >= {100 * t:g}%: " + (
                f"first at epoch {reached['epoch']}, after {reached['hours']:.3g} h of epochs" if reached else "not reached"))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("loss", ("train/loss", "val/loss")), ("accuracy (%)", ("train/acc1", "val/acc1", "val/acc5")), ("lr", ("lr",)))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(e, r[key] * (100 if "acc" in key else 1)) for e, r in zip(epochs, history) if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_history(history: list[dict[str, float]], out: Path) -> None:
    table = Table(title=f"Training history ({out})")
    for column in ("epoch", "lr", *REPORT_KEYS, "epoch time"):
        table.add_column(column, justify="right")
    fmt = lambda r, k: (f"{100 * r[k]:.2f}%" if "acc" in k else f"{r[k]:.4f}") if k in r else "-"
    for r in history:
        table.add_row(str(r["epoch"] + 1), f"{r['lr']:.4g}", *(fmt(r, k) for k in REPORT_KEYS), f"{r['epoch_s']:.1f}s")
    Console(width=max(Console().width, 110)).print(table)
    best = max(history, key=lambda r: r.get("val/acc1", -1))
    if "val/acc1" in best:
        Console().print(
            f"best val/acc1 {100 * best['val/acc1']:.2f}% (top-1 err {100 * (1 - best['val/acc1']):.2f}%) at epoch "
            f"{best['epoch'] + 1}; curves: {out / 'curves.png'}"
        )
