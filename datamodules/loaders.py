"""The loader contract every backend shares: what a loader builder gets (`LoaderSpec`), how ranks shard a split
and split the global batch, and how loader worker processes start."""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from lightning.fabric.utilities.seed import pl_worker_init_function
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Sampler

from datamodules.order import EpochOrder
from datamodules.transforms import ProgressiveResizing


class EvalShardBatchSampler(Sampler[list[int]]):
    """Batches of this rank's strided shard (rank, rank + world, ...): no index padded or repeated, and the
    same number of batches on every rank: a DDP forward syncs buffers, so one extra batch on one rank hangs.
    Shards differ by one image at most; with one image a batch the larger shards' last batch holds two (the
    only way to keep the counts equal without repeating an image).

    Raises:
        ValueError: fewer images than ranks; the same on every rank (an error on some ranks only would leave the
            others waiting in a collective).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} evaluation images cannot be shared by {world_size} ranks: every rank "
                             "needs one at least (use fewer ranks)")
        self.indices = np.arange(rank, num_samples, world_size)
        self.num_batches = min(math.ceil(math.ceil(num_samples / world_size) / batch_size), num_samples // world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in np.array_split(self.indices, self.num_batches):
            yield chunk.tolist()

    def __len__(self) -> int:
        return self.num_batches


def per_device_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank share of a global batch; a clear error when it does not divide."""
    if batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch and must divide by the world size "
            f"{world_size} (trainer.num_nodes x trainer.devices); e.g. use {max(1, batch_size // world_size) * world_size}"
        )
    return batch_size // world_size


def default_num_workers(requested: Optional[int] = None) -> int:
    """Loader processes per rank: `requested`, or when None the CPUs this process may use (a SLURM allocation,
    a taskset), at most 8."""
    if requested is not None:
        return requested
    return min(8, usable_cpus())


def usable_cpus() -> int:
    """CPUs this process may use (a SLURM allocation, a taskset: its CPU affinity), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_loader_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader worker start-up: Lightning's seeding, then the job signals.
    - Seeds: a loader with a worker_init_fn of its own gets none from Lightning, so this one applies Lightning's
      `pl_worker_init_function` where `seed_everything(workers=True)` asked for it (the command line does):
      augmentations drawn from (seed, rank, worker), different on every rank.
    - Signals: SLURM signals every process of a job step, workers included (SIGUSR1 before the time limit,
      SIGTERM on preemption or scancel); a worker killed by it would turn the main process's orderly save into a
      "DataLoader worker killed" crash. So a worker ignores SIGUSR1, and exits on SIGTERM only when its parent sends
      it (the DataLoader or multiprocessing shutting it down); the main process decides the rest."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending for the thread below, in every thread
    parent = os.getppid()

    def wait_for_sigterm() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # asked by the parent: leave at once, as its terminate() expects

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def trainer_world(trainer: Optional[pl.Trainer]) -> tuple[int, int]:
    """(global rank, world size); (0, 1) before a trainer is attached."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def equal_count_batch_size(num_samples: int, world_size: int, batch_size: int) -> int:
    """The largest batch size <= `batch_size` that gives every rank's strided shard (sizes differ by at most one)
    the same number of batches, for loaders that cannot vary their batch size (DDP needs equal counts)."""
    small, large = num_samples // world_size, math.ceil(num_samples / world_size)
    for b in range(batch_size, 0, -1):
        if math.ceil(small / b) == math.ceil(large / b):
            return b
    return 1


@dataclass
class LoaderSpec:
    """What every backend's loader builder gets: this rank's view of one split and the augmentation settings.
    Loaders yield (images, labels): images NCHW, either uint8 (normalised on the device by the DataModule) or
    float already normalised with IMAGENET_MEAN/STD; labels int64 of shape (N,)."""

    samples: list[tuple[str, int]]  # the whole split, (path, label), sorted; labels index the sorted classes
    rank: int
    world_size: int
    batch_size: int  # per device
    num_workers: int
    seed: int
    crop_size: int  # training crop side (the first epoch's, with progressive resizing)
    val_resize_size: int
    scale: tuple[float, float]  # RandomResizedCrop area range
    ratio: tuple[float, float]  # RandomResizedCrop aspect-ratio range (3/4, 4/3)
    hflip: bool
    device: torch.device  # where the model runs (cuda:N or cpu)
    order: Optional[EpochOrder] = None  # training: this rank's order and resume position (set_epoch goes to it)
    val_crop_size: Optional[int] = None  # validation crop side; None = crop_size (see val_crop)
    resizing: Optional[ProgressiveResizing] = None  # training crop side by epoch (None: crop_size throughout)

    @property
    def val_crop(self) -> int:
        """The validation crop side in pixels."""
        return self.val_crop_size or self.crop_size

    def train_crop_at(self, epoch: int) -> int:
        """The training crop side in pixels in `epoch` (0-based)."""
        return self.resizing.at(epoch) if self.resizing is not None else self.crop_size
