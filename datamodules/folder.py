"""The ImageNet folder layout (`root/{train,val}/<wnid>/*.JPEG`) read as (uint8 CHW tensor, label) pairs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

log = logging.getLogger(__name__)

# ImageNet's train set holds one PNG and a few CMYK files under .JPEG names; decode_image takes both.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class DatasetLayoutError(ValueError):
    """The folder tree does not have the layout the DataModule reads."""


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names (WordNet ids on ImageNet) of one split."""
    if not split_dir.is_dir():
        raise DatasetLayoutError(
            f"{split_dir}: missing. Expected the ImageNet layout <root>/train/<wnid>/*.JPEG and "
            "<root>/val/<wnid>/*.JPEG (see README, 'Training on ImageNet')."
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DatasetLayoutError(f"{split_dir}: no class folders in it (expected <wnid>/ sub-folders)")
    return classes


def scan_split(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) for every image of a split, sorted, with the class folders checked against `class_to_idx`."""
    samples: list[tuple[str, int]] = []
    for wnid in find_classes(split_dir):
        if wnid not in class_to_idx:
            raise DatasetLayoutError(
                f"{split_dir / wnid}: class {wnid!r} is not among the {len(class_to_idx)} train classes"
            )
        files = sorted(
            e.path for e in os.scandir(split_dir / wnid) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DatasetLayoutError(f"{split_dir / wnid}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        samples.extend((f, class_to_idx[wnid]) for f in files)
    return samples


def decode(path: str) -> torch.Tensor:
    """RGB uint8 CHW tensor of one image file; a CorruptImageError naming the path if it cannot be read."""
    data = read_file(path)  # a missing or unreadable file is an I/O problem, never skipped as "corrupt"
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:  # torchvision reports truncated and undecodable files as RuntimeError
        raise CorruptImageError(f"{path}: cannot decode image ({str(e).strip().splitlines()[-1]})") from e


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: a function of (seed, epoch, sample index) alone, so that
    the crops do not depend on the loader workers, the ranks or a resume."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ImageFolderDataset(Dataset):
    """Samples of one split, read by index or by an `(index, epoch)` key (the training order's): with a key and a
    `seed`, the transform draws its random numbers from `sample_seed(seed, epoch, index)` (torch's generator,
    forked: the caller's is untouched). `max_corrupt` > 0 replaces up to that many undecodable images per worker
    by the next good one, with a warning naming each (for training; evaluation keeps 0)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        max_corrupt: int = 0,
        seed: Optional[int] = None,
    ):
        self.samples = samples
        self.transform = transform
        self.max_corrupt = max_corrupt
        self.seed = seed
        self.corrupt_paths: set[str] = set()  # per process: each DataLoader worker holds its own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        first = index
        path, label = self.samples[index]
        while True:
            if path not in self.corrupt_paths:  # a known bad file is not decoded again
                try:
                    image = decode(path)
                    break
                except CorruptImageError:
                    self.corrupt_paths.add(path)
                    if len(self.corrupt_paths) > min(self.max_corrupt, len(self.samples) - 1):
                        raise
                    worker = torch.utils.data.get_worker_info()
                    log.warning(
                        "skipped corrupt image %s (%d so far in loader worker %s, limit %d)",
                        path, len(self.corrupt_paths), worker.id if worker else "main", self.max_corrupt,
                    )
            index = (index + 1) % len(self.samples)
            path, label = self.samples[index]
        if self.transform is None:
            return image, label
        if epoch is None or self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, first))
            return self.transform(image), label
