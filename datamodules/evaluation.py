"""Evaluation data: every image of a split as the views of one ILSVRC protocol, sharded so that each image is
seen by exactly one rank, batched so that views of the same size go through the network together."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.folder import DatasetLayoutError, ImageFolderDataset, WorkerSafeLoader, find_classes, scan_split
from datamodules.loaders import EvalShardBatchSampler, default_num_workers, per_device_batch_size, trainer_world
from datamodules.transforms import EvalViews

log = logging.getLogger(__name__)

# One loader batch: groups of same-size views (uint8 NCHW) with the batch position of the image each belongs
# to, then the labels and the dataset indices of the batch's images.
ViewBatch = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]


class _WithIndex(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        views, label = self.dataset[index]
        return views, label, index


def collate_views(samples: list[tuple[list[torch.Tensor], int, int]]) -> ViewBatch:
    """Groups the views of a batch by size (multi-scale views differ with each image's aspect ratio)."""
    groups: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int]]] = defaultdict(lambda: ([], []))
    for position, (views, _, _) in enumerate(samples):
        for view in views:
            tensors, owners = groups[tuple(view.shape)]
            tensors.append(view)
            owners.append(position)
    # default_collate stacks into shared memory inside a loader worker: no extra copy to the main process.
    stacked = [(default_collate(tensors), torch.tensor(owners)) for tensors, owners in groups.values()]
    labels = torch.tensor([label for _, label, _ in samples])
    indices = torch.tensor([index for _, _, index in samples])
    return stacked, labels, indices


class EvalDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: Optional[int] = None,
        split: str = "val",
        pin_memory: bool = True,
        views: Optional[EvalViews] = None,
        classes: Optional[list[str]] = None,
    ):
        """
        Args:
            root: folder holding `<split>/<wnid>/*.JPEG` (the ImageNet layout of training).
            batch_size: images per loader batch, all ranks together (each image brings all its views).
            num_workers: loader processes per rank; None = the CPUs this process may use, at most 8.
            split: the sub-folder evaluated.
            pin_memory: page-locked host batches for faster copies to the GPU.
            views: the protocol's views of each image (set by `resnet evaluate`).
            classes: the model's class names in output order; None = the sorted folders of `train/` (or of the
                split when `train/` is absent).
        """
        super().__init__()
        self.root, self.split = Path(root), split
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.views = views or EvalViews("center")
        self.classes = list(classes) if classes else []
        self.dataset: Optional[ImageFolderDataset] = None

    @property
    def ids(self) -> list[str]:
        """Image ids: paths relative to the split folder (`n01440764/ILSVRC2012_val_00000293.JPEG`)."""
        split_dir = self.root / self.split
        return [str(Path(path).relative_to(split_dir)) for path, _ in self.dataset.samples]

    def setup(self, stage: str) -> None:
        if self.dataset is not None:  # `resnet evaluate` sets up before the Trainer does: scan the folder once
            return
        split_dir = self.root / self.split
        if not self.classes:
            train_dir = self.root / "train"
            self.classes = find_classes(train_dir if train_dir.is_dir() else split_dir)
            log.info("class indices: the %d sorted folders of %s", len(self.classes), train_dir if train_dir.is_dir() else split_dir)
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        try:
            samples = scan_split(split_dir, class_to_idx)
        except DatasetLayoutError as e:
            raise DatasetLayoutError(f"{e} (the model predicts {len(self.classes)} classes: {self.classes[:3]}...)") from None
        self.dataset = ImageFolderDataset(samples, self.views)  # no `skipped`: an evaluation never skips an image
        per_device_batch_size(self.batch_size, trainer_world(self.trainer)[1])  # fail before any work

    def test_dataloader(self) -> DataLoader:
        rank, world = trainer_world(self.trainer)
        batches = EvalShardBatchSampler(len(self.dataset), per_device_batch_size(self.batch_size, world), rank, world)
        workers = default_num_workers(self.num_workers)
        return WorkerSafeLoader(
            _WithIndex(self.dataset),
            batch_sampler=batches,
            collate_fn=collate_views,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
