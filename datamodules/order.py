"""The training order of an epoch and a position in it, the same in every backend, so that a resumed run reads
exactly the batches the uninterrupted run would have read next.

The order of epoch `e` is torch's DistributedSampler order (shuffle, `seed + e`): one permutation of the N samples,
padded by its own head to a multiple of the world size W, dealt out strided (rank r takes positions r, r + W, ...).
After k batches of B per rank the ranks together have read the first k x B x W positions of that sequence, whatever
the rank: a position is one number, `samples` (global), and each rank continues at `samples + rank` with stride W.
A run resumed with another world size deals the rest of the same permutation among its ranks (no image read twice
or skipped within the epoch; the padding is redrawn from the rest)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch `epoch`: `torch.randperm` seeded `seed + epoch`, as DistributedSampler draws it.

    Returns:
        int64 array of shape (num_samples,).
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=g).numpy()


def rank_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0,
               start_world_size: Optional[int] = None) -> np.ndarray:
    """Sample indices rank `rank` reads in epoch `epoch` from global position `start` on.

    Args:
        num_samples, seed, epoch: the permutation (`epoch_permutation`).
        rank, world_size: this process among all.
        start: samples already read in this epoch by all ranks together (a multiple of the world size that read them).
        start_world_size: the world size that read them; None = `world_size`.

    Returns:
        int64 array; at `start=0` exactly `DistributedSampler(shuffle=True, seed=seed)` after `set_epoch(epoch)`.
    """
    perm = epoch_permutation(num_samples, seed, epoch)
    old = start_world_size or world_size
    if old == world_size:  # the same padded sequence as the uninterrupted run
        padded = np.concatenate([perm, perm[: (-num_samples) % world_size]])
        return padded[start + rank :: world_size]
    rest = perm[min(start, num_samples):]  # another world size: deal out what is left of the permutation
    if len(rest) == 0:
        return rest
    padded = np.concatenate([rest, np.resize(rest, (-len(rest)) % world_size)])
    return padded[rank::world_size]


@dataclass
class TrainPosition:
    """Where the ranks are in an epoch's order: `samples` read by all ranks together (whole batches) in `epoch`.
    Stored in every checkpoint (the DataModule's state) and given back to the loaders on resume."""

    epoch: int
    samples: int
    world_size: int
    batch_size: int  # per rank

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Optional[dict]) -> Optional["TrainPosition"]:
        return cls(**{k: int(state[k]) for k in ("epoch", "samples", "world_size", "batch_size")}) if state else None


class EpochOrder:
    """One rank's view of the training order, with Lightning's `set_epoch` and a resume position.

    Lightning calls `set_epoch(trainer epoch)` before each epoch; a loader calls `begin_pass()` when its first batch
    is requested (not when `iter()` is called: Lightning creates the training iterator before `set_epoch` on a
    resume) and `batches_read(k)` as batches are handed to the training loop."""

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, batch_size: int):
        """
        Args:
            num_samples: samples of the training split.
            seed: the shuffle seed (`data.seed`).
            rank, world_size: this process among all.
            batch_size: per rank; a rank's last partial batch is dropped (every rank steps alike).
        """
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.batch_size = batch_size
        self.epoch = 0
        self.batches_per_epoch = -(-num_samples // world_size) // batch_size
        self._resume: Optional[TrainPosition] = None
        self._pass_epoch, self._pass_start, self._read = 0, 0, 0  # the pass being read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, position: Optional[TrainPosition]) -> None:
        """The next pass of `position.epoch` starts at `position.samples` (later epochs start at 0)."""
        self._resume = position

    def begin_pass(self) -> np.ndarray:
        """This rank's indices for the pass starting now: whole batches, from the resume position when the pass is
        of the epoch that position is in."""
        start, old_world = 0, self.world_size
        position, self._resume = self._resume, None
        if position is not None and position.epoch == self.epoch:
            start, old_world = position.samples, position.world_size
            if (old_world, position.batch_size) != (self.world_size, self.batch_size):
                log.warning("resuming epoch %d at sample %d with %d ranks x %d (saved with %d x %d): the rest of the "
                            "epoch is dealt out anew", self.epoch, start, self.world_size, self.batch_size, old_world,
                            position.batch_size)
        elif position is not None and position.epoch > self.epoch:
            self._resume = position  # not this pass yet (e.g. a sanity pass)
        self._pass_epoch, self._pass_start, self._read = self.epoch, start, 0
        return self.indices(self.epoch, start, old_world)

    def indices(self, epoch: int, start: int = 0, start_world_size: Optional[int] = None) -> np.ndarray:
        """This rank's indices of `epoch` from global sample `start` (dealt by `start_world_size` ranks before it),
        whole batches only: int64 (k * batch_size,)."""
        order = rank_order(self.num_samples, self.seed, epoch, self.rank, self.world_size, start,
                           start_world_size or self.world_size)
        batches = min(len(order) // self.batch_size, self.batches_per_epoch)
        return order[: batches * self.batch_size]

    @property
    def pass_epoch(self) -> int:
        """The epoch of the pass being read."""
        return self._pass_epoch

    @property
    def pass_start(self) -> int:
        """The global sample the pass being read started at (0, or a resume position)."""
        return self._pass_start

    def batches_read(self, count: int = 1) -> None:
        self._read += count

    def position(self) -> TrainPosition:
        """Where the training loop is: the pass's start plus the batches handed to it, all ranks together (a resume
        position not yet reached is returned as it is)."""
        if self._resume is not None:
            return self._resume
        return TrainPosition(self._pass_epoch, self._pass_start + self._read * self.batch_size * self.world_size,
                             self.world_size, self.batch_size)

    def batches(self, indices: np.ndarray) -> Iterator[list[tuple[int, int]]]:
        """(index, epoch) keys in batches: the dataset draws each sample's augmentation from them."""
        epoch = self._pass_epoch
        for i in range(0, len(indices), self.batch_size):
            yield [(int(k), epoch) for k in indices[i : i + self.batch_size]]
