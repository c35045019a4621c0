"""The torchvision backend, the reference the others match: a DataLoader over the image folders (decoding with
torchvision.io, PIL for what it lacks), its augmentations from datamodules/transforms.py, each image's randomness a
function of (seed, epoch, index, copy)."""

from __future__ import annotations

import functools

import torch

from datamodules.backends.base import TORCHVISION_ONLY, LoaderBackend
from datamodules.folder import ImageFolderDataset, TrainLoader, WorkerSafeLoader
from datamodules.loaders import EvalShardBatchSampler, LoaderSpec, init_loader_worker


class TorchvisionBackend(LoaderBackend):
    name = "torchvision"
    augmentations = frozenset(TORCHVISION_ONLY)

    def _loader(self, spec: LoaderSpec, dataset: ImageFolderDataset, **kwargs) -> WorkerSafeLoader:
        workers = spec.num_workers
        return (TrainLoader if "order" in kwargs else WorkerSafeLoader)(
            dataset,
            num_workers=workers,
            pin_memory=self.dm.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(init_loader_worker, rank=spec.rank),
            **kwargs,
        )

    def train_loader(self, spec: LoaderSpec, dataset: ImageFolderDataset) -> TrainLoader:
        # The order of datamodules/order.py (DistributedSampler's, also on one rank): the same shuffle for any world
        # size, resumable mid-epoch; Lightning calls set_epoch.
        return self._loader(spec, dataset, order=spec.order)

    def val_loader(self, spec: LoaderSpec, dataset: ImageFolderDataset) -> WorkerSafeLoader:
        batches = EvalShardBatchSampler(len(dataset), spec.batch_size, spec.rank, spec.world_size)
        return self._loader(spec, dataset, batch_sampler=batches)
