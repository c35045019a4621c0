"""The ImageNet folder layout (`root/{train,val}/<wnid>/*.JPEG`) read as (uint8 CHW tensor, label) pairs: the
hidden-file rule, decoding to 8-bit RGB, skipping unreadable training images, and the torchvision backend's training
loader."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file

from datamodules.order import EpochOrder, TrainPosition

log = logging.getLogger(__name__)

# ImageNet's train set holds one PNG and a few CMYK files under .JPEG names; decode_image takes both.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Never samples or classes: what file browsers, archivers and file systems leave in a copied tree (macOS `._x`
# companions and `.DS_Store`, `__MACOSX/` of zip files, Windows' thumbnails, `lost+found` at a mount point).
OS_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information",
                      "lost+found"})


def is_hidden(name: str) -> bool:
    """True for hidden (dot) and operating-system files and folders: never a sample or a class, in any backend."""
    return name.startswith(".") or name in OS_NAMES


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
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))
    if not classes:
        images = [e.name for e in os.scandir(split_dir) if e.name.lower().endswith(IMAGE_EXTENSIONS)][:1]
        if images:  # the val tar's (or Kaggle's) flat folder: labels live in the devkit or a CSV
            raise DatasetLayoutError(
                f"{split_dir}: images directly in it (e.g. {images[0]}), no <wnid>/ class folders: arrange it with "
                f"`resnet prepare imagenet --dst {split_dir.parent} --src <folder with the official files>`"
            )
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
            e.path for e in os.scandir(split_dir / wnid)
            if not is_hidden(e.name) and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
        )
        if not files:
            raise DatasetLayoutError(f"{split_dir / wnid}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        samples.extend((f, class_to_idx[wnid]) for f in files)
    return samples


def decode(path: str) -> torch.Tensor:
    """One image file as 8-bit RGB: uint8 (3, H, W), whatever it holds (CMYK, gray, palette and alpha JPEG/PNG,
    16-bit PNG scaled to 8 bits, and the formats Pillow reads that torchvision does not, e.g. BMP, TIFF).

    Raises:
        CorruptImageError: naming the path, for an empty, truncated or undecodable file.
        OSError / RuntimeError: a missing or unreadable file (an I/O problem, never skipped as "corrupt").
    """
    try:
        data = read_file(path)
    except RuntimeError:
        if os.path.isfile(path) and os.path.getsize(path) == 0:  # torchvision cannot read an empty file either
            raise CorruptImageError(f"{path}: empty file (0 bytes)") from None
        raise
    return decode_bytes(data, path)


def decode_bytes(data: torch.Tensor, path: str) -> torch.Tensor:
    """`decode` of a file's bytes (uint8 1-D tensor) already read; `path` names it in errors."""
    if data.numel() == 0:
        raise CorruptImageError(f"{path}: empty file (0 bytes)")
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:  # torchvision reports truncated and undecodable files as RuntimeError
        # Its last line, less the C++ source location: "Image is incomplete or truncated", "Unsupported image file...".
        image = _decode_with_pillow(data, path, re.sub(r"^.*?\.cpp:\d+, ", "", str(e).strip().splitlines()[-1]))
    if image.dtype != torch.uint8:  # a 16-bit PNG: its high byte, as every 8-bit reduction of it
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _decode_with_pillow(data: torch.Tensor, path: str, torchvision_error: str) -> torch.Tensor:
    """The formats torchvision lacks; a CorruptImageError with torchvision's reason when Pillow fails too."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            image.load()  # truncated data raises here: Pillow's LOAD_TRUNCATED_IMAGES stays False
            if image.mode in ("I;16", "I;16B", "I"):  # 16-bit gray: Pillow's own RGB conversion clips at 255
                pixels = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return torch.from_numpy(pixels).expand(3, *pixels.shape).contiguous()
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"{path}: cannot decode image ({torchvision_error})") from e


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """The seed of one sample's augmentation in one epoch: a function of (seed, epoch, sample index) alone, so that
    the crops do not depend on the loader workers, the ranks or a resume; `copy`: which of its repeats under
    repeated augmentation (each copy its own crop; copy 0 has the seed it has without repeats)."""
    entropy = [seed, epoch, index] + ([copy] if copy else [])
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SkippedImages:
    """The unreadable training images skipped in a run, counted over all its loader workers, ranks and restarts: one
    line per skip appended to a file in the run folder (`<run>/skipped_images.txt`; O_APPEND writes of one line do
    not interleave on a local file system; on NFS, ranks of several nodes may rarely lose a line: the count is then
    low by one, never high), distinct paths counted against the limit."""

    def __init__(self, path: str | Path, limit: int):
        self.path, self.limit = Path(path), limit

    def paths(self) -> list[str]:
        """The distinct paths skipped so far, in the order first skipped."""
        if not self.path.is_file():
            return []
        return list(dict.fromkeys(line.split("\t", 1)[0] for line in self.path.read_text().splitlines() if line))

    def add(self, error: CorruptImageError, path: str) -> list[str]:
        """Records one skip; returns the distinct paths so far.

        Raises:
            CorruptImageError: more than `limit` distinct paths, naming them.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, f"{path}\t{str(error).removeprefix(path + ': ')}\n".encode())
        finally:
            os.close(handle)
        skipped = self.paths()
        if len(skipped) > self.limit:
            raise CorruptImageError(
                f"{len(skipped)} unreadable training images in this run, more than data.max_corrupt_train_images="
                f"{self.limit} ({self.path}): " + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                + f"; `resnet prepare check --root {Path(path).parents[2]}` lists them all and its manifest leaves "
                "them out"
            ) from error
        return skipped


class ImageFolderDataset(Dataset):
    """Samples of one split, read by index or by an `(index, epoch)` or `(index, epoch, copy)` key (the training
    order's): with a key and a `seed`, the transform draws its random numbers from `sample_seed(seed, epoch, index,
    copy)` (torch's generator,
    forked: the caller's is untouched). With `skipped` (training), an undecodable image is replaced by the next
    good one and recorded there, up to its limit over the whole run; without it (evaluation) it is an error."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        skipped: Optional[SkippedImages] = None,
        seed: Optional[int] = None,
    ):
        self.samples = samples
        self.transform = transform
        self.skipped = skipped
        self.seed = seed
        self.corrupt_paths: set[str] = set()  # this process's: a known bad file is not read again

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Union[int, tuple[int, ...]]) -> tuple[torch.Tensor, int]:
        index, epoch, copy = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        first = index
        path, label = self.samples[index]
        while True:
            if path not in self.corrupt_paths:
                try:
                    image = decode(path)
                    break
                except CorruptImageError as e:
                    if self.skipped is None or len(self.corrupt_paths) + 1 >= len(self.samples):
                        raise
                    self.corrupt_paths.add(path)
                    count = len(self.skipped.add(e, path))  # raises past the run's limit
                    log.warning("skipped unreadable training image %s (%d in this run, limit %d)", e, count,
                                self.skipped.limit)
            index = (index + 1) % len(self.samples)
            path, label = self.samples[index]
        if self.transform is None:
            return image, label
        transform = self.transform
        if epoch is not None and hasattr(transform, "for_epoch"):  # progressive resizing: the epoch's crop side
            transform = transform.for_epoch(epoch)
        if epoch is None or self.seed is None:
            return transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, first, copy))
            return transform(image), label


class _OrderBatches(Sampler[list[tuple[int, int, int]]]):
    """Batches of (index, epoch, copy) keys of one pass over an EpochOrder; `sampler` is where Lightning's
    `_set_sampler_epoch` finds `set_epoch` (it looks at `loader.batch_sampler.sampler`)."""

    def __init__(self, order: EpochOrder):
        self.order = self.sampler = order

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # A generator: the pass begins at the first batch drawn (a DataLoader iterator calls iter() on its batch
        # sampler twice as it starts, and the first one is never read).
        yield from self.order.batches(self.order.begin_pass())

    def __len__(self) -> int:
        return self.order.batches_per_epoch


@contextlib.contextmanager
def job_signals_blocked(active: bool = True):
    """SIGTERM and SIGUSR1 held back in this thread for the block (delivered at its end). Loader workers forked in
    it start with both blocked: SLURM signals every process of a job step, and a worker that met SIGTERM before its
    init function (init_loader_worker) set its own handling would die of it, under torch's worker handler, which
    re-raises a SIGTERM not sent by the parent (seen: preemption as a training pass started its workers)."""
    if not active:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerSafeLoader(DataLoader):
    """A DataLoader whose worker processes start with the job signals blocked (`job_signals_blocked`)."""

    def __iter__(self):
        with job_signals_blocked(self.num_workers > 0):
            return super().__iter__()


class TrainLoader(WorkerSafeLoader):
    """The torchvision backend's training DataLoader, resumable mid-epoch:
    - a pass starts when its first batch is requested: Lightning creates the training iterator before it calls
      `set_epoch` when it resumes, and a DataLoader with workers would have drawn its first indices from the stale
      epoch right then;
    - `state_dict()` is the position in the epoch (`TrainPosition`), counting the batches handed to the training
      loop (not those the workers prefetched); `load_state_dict()` makes the next pass of that epoch start there.
    `len()` is always the whole epoch's batches, as Lightning counts a resumed epoch's batches from its start."""

    def __init__(self, dataset: Dataset, order: EpochOrder, **kwargs):
        super().__init__(dataset, batch_sampler=_OrderBatches(order), **kwargs)
        self.order = order

    def __iter__(self):
        return self._pass()

    def _pass(self):
        for batch in super().__iter__():  # workers forked with the job signals blocked
            self.order.batches_read()
            yield batch

    def state_dict(self) -> dict:
        return self.order.position().as_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.resume_at(TrainPosition.from_dict(state))
