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


def rank_positions(num_samples: int, rank: int, world_size: int, start: int = 0,
                   start_world_size: Optional[int] = None, repeats: int = 1, redeal: bool = False) -> np.ndarray:
    """Positions rank `rank` reads in an epoch's sequence from global position `start` on.

    The sequence is the epoch's permutation with each sample `repeats` times in a row (repeated augmentation:
    torchvision's RASampler, after DeiT; 1 = the permutation itself), read as torch's DistributedSampler reads the
    permutation: padded cyclically to a multiple of the world size and dealt out strided. An epoch holds as many
    samples as without repeats (`num_samples`, padded), so about `num_samples / repeats` distinct images.

    Args:
        num_samples: samples of the training split.
        rank, world_size: this process among all.
        start: positions already read in this epoch by all ranks together (a multiple of the world size that read them).
        start_world_size: the world size that read them; None = `world_size`.
        repeats: copies of each sample in the sequence.
        redeal: deal out the positions from `start` to the epoch's end anew (as after a world-size change).

    Returns:
        int64 array of positions in [0, num_samples x repeats).
    """
    length = num_samples * repeats
    old = start_world_size or world_size
    if old == world_size and not redeal:  # the same padded sequence as the uninterrupted run
        total = -(-num_samples // world_size) * world_size
        return np.arange(start + rank, total, world_size, dtype=np.int64) % length
    rest = np.arange(min(start, num_samples), num_samples, dtype=np.int64)  # another world size: deal out the rest
    if len(rest) == 0:
        return rest
    return np.resize(rest, len(rest) + (-len(rest)) % world_size)[rank::world_size]


def rank_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0,
               start_world_size: Optional[int] = None, repeats: int = 1) -> np.ndarray:
    """Sample indices rank `rank` reads in epoch `epoch` from global position `start` on (`rank_positions`).

    Args:
        num_samples, seed, epoch: the permutation (`epoch_permutation`).
        rank, world_size, start, start_world_size, repeats: as `rank_positions`.

    Returns:
        int64 array; at `start=0` and `repeats=1` exactly `DistributedSampler(shuffle=True, seed=seed)` after
        `set_epoch(epoch)`.
    """
    positions = rank_positions(num_samples, rank, world_size, start, start_world_size, repeats)
    return epoch_permutation(num_samples, seed, epoch)[positions // repeats]


@dataclass
class TrainPosition:
    """Where the ranks are in an epoch's order: `samples` read by all ranks together (whole batches) in `epoch`.
    Stored in every checkpoint (the DataModule's state) and given back to the loaders on resume."""

    epoch: int
    samples: int
    world_size: int
    batch_size: int  # per rank
    repeats: int = 1  # repeated augmentation's copies (checkpoints from before it: 1)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Optional[dict]) -> Optional["TrainPosition"]:
        if not state:
            return None
        return cls(**{k: int(state[k]) for k in ("epoch", "samples", "world_size", "batch_size")},
                   repeats=int(state.get("repeats", 1)))


class EpochOrder:
    """One rank's view of the training order, with Lightning's `set_epoch` and a resume position.

    Lightning calls `set_epoch(trainer epoch)` before each epoch; a loader calls `begin_pass()` when its first batch
    is requested (not when `iter()` is called: Lightning creates the training iterator before `set_epoch` on a
    resume) and `batches_read(k)` as batches are handed to the training loop."""

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, batch_size: int, repeats: int = 1):
        """
        Args:
            num_samples: samples of the training split.
            seed: the shuffle seed (`data.seed`).
            rank, world_size: this process among all.
            batch_size: per rank; a rank's last partial batch is dropped (every rank steps alike).
            repeats: repeated augmentation, copies of each sampled image in an epoch (`rank_positions`; 1 = off).

        Raises:
            ValueError: repeats below 1.
        """
        if repeats < 1:
            raise ValueError(f"data.repeated_augmentation={repeats}: copies of each image, at least 1 (1 = off)")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.batch_size, self.repeats = batch_size, repeats
        self._pass_repeats = np.zeros(0, np.int64)  # which copy each index of the pass being read is
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
        start, old_world, redeal = 0, self.world_size, False
        position, self._resume = self._resume, None
        if position is not None and position.epoch == self.epoch:
            start, old_world = position.samples, position.world_size
            if (old_world, position.batch_size) != (self.world_size, self.batch_size):
                log.warning("resuming epoch %d at sample %d with %d ranks x %d (saved with %d x %d): the rest of the "
                            "epoch is dealt out anew", self.epoch, start, self.world_size, self.batch_size, old_world,
                            position.batch_size)
            if position.repeats != self.repeats:  # another sequence: its positions past `start` are not the rest
                log.warning("resuming epoch %d at sample %d with data.repeated_augmentation=%d (saved with %d): the rest "
                            "of the epoch is dealt out anew", self.epoch, start, self.repeats, position.repeats)
                redeal = True
        elif position is not None and position.epoch > self.epoch:
            self._resume = position  # not this pass yet (e.g. a sanity pass)
        self._pass_epoch, self._pass_start, self._read = self.epoch, start, 0
        indices, self._pass_repeats = self.keys(self.epoch, start, old_world, redeal)
        return indices

    def keys(self, epoch: int, start: int = 0, start_world_size: Optional[int] = None,
             redeal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """This rank's samples of `epoch` from global position `start` (dealt by `start_world_size` ranks before it;
        `redeal`: the rest dealt out anew whatever the world size), whole batches only: (indices, copies), int64
        (k * batch_size,) each; copies count each index's repeats (0 up to `repeats` - 1; all 0 without repeated
        augmentation)."""
        positions = rank_positions(self.num_samples, self.rank, self.world_size, start,
                                   start_world_size or self.world_size, self.repeats, redeal)
        batches = min(len(positions) // self.batch_size, self.batches_per_epoch)
        positions = positions[: batches * self.batch_size]
        return epoch_permutation(self.num_samples, self.seed, epoch)[positions // self.repeats], positions % self.repeats

    def indices(self, epoch: int, start: int = 0, start_world_size: Optional[int] = None) -> np.ndarray:
        """The indices of `keys`: int64 (k * batch_size,)."""
        return self.keys(epoch, start, start_world_size)[0]

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
                             self.world_size, self.batch_size, self.repeats)

    def batches(self, indices: np.ndarray) -> Iterator[list[tuple[int, int, int]]]:
        """(index, epoch, copy) keys in batches, for the pass `begin_pass` returned `indices` of: the dataset draws
        each sample's augmentation from them (copy 0 without repeated augmentation)."""
        epoch = self._pass_epoch
        assert len(indices) == len(self._pass_repeats), "batches() takes the indices begin_pass() returned"
        for i in range(0, len(indices), self.batch_size):
            batch = slice(i, i + self.batch_size)
            yield [(int(k), epoch, int(c)) for k, c in zip(indices[batch], self._pass_repeats[batch])]
