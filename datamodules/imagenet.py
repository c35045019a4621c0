"""ImageNet-folder DataModule: global batch split over ranks, each validation image counted exactly once."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import pl_worker_init_function
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.order import EpochOrder, TrainPosition
from datamodules.folder import DatasetLayoutError, ImageFolderDataset, SkippedImages, TrainLoader, WorkerSafeLoader
from datamodules.samples import gather_objects, load_samples, sample_fingerprint, without_formats_dali_lacks
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch, train_transform, val_transform

log = logging.getLogger(__name__)


class EvalShardBatchSampler(Sampler[list[int]]):
    """Batches of this rank's strided shard (rank, rank + world, ...): no index padded or repeated, and the
    same number of batches on every rank: a DDP forward syncs buffers, so one extra batch on one rank hangs."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = np.arange(rank, num_samples, world_size)
        self.num_batches = math.ceil(math.ceil(num_samples / world_size) / batch_size)
        if len(self.indices) < self.num_batches:
            raise ValueError(f"{num_samples} validation images cannot fill {self.num_batches} batches on each of {world_size} ranks")

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
    crop_size: int
    val_resize_size: int
    scale: tuple[float, float]  # RandomResizedCrop area range
    ratio: tuple[float, float]  # RandomResizedCrop aspect-ratio range (3/4, 4/3)
    hflip: bool
    device: torch.device  # where the model runs (cuda:N or cpu)
    order: Optional[EpochOrder] = None  # training: this rank's order and resume position (set_epoch goes to it)


class ImageNetDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        num_workers: Optional[int] = None,
        crop_size: int = 224,
        val_resize_size: int = 256,
        train_augmentation: Literal["random_resized_crop", "scale_jitter"] = "random_resized_crop",
        random_resized_crop_scale: tuple[float, float] = (0.08, 1.0),
        scale_jitter_range: tuple[int, int] = (256, 480),
        hflip: bool = True,
        lighting_std: float = 0.0,
        max_corrupt_train_images: int = 16,
        pin_memory: bool = True,
        seed: int = 0,
        backend: Literal["torchvision", "dali", "ffcv"] = "torchvision",
        dali_device: Literal["auto", "cpu", "gpu"] = "auto",
        ffcv_dir: Optional[str] = None,
        ffcv_order: Literal["random", "quasi_random"] = "random",
        ffcv_os_cache: bool = True,
        manifest: Optional[str] = None,
    ):
        """
        Args:
            root: folder holding `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.
            batch_size: global batch (all ranks together); each rank loads batch_size / world_size.
            num_workers: loader processes per rank; None = the CPUs this process may use, at most 8.
            crop_size: side of the square training and validation crops.
            val_resize_size: validation shorter side before the centre crop (256 for 224 crops).
            train_augmentation: `random_resized_crop` (torchvision) or `scale_jitter` (He et al. 2015).
            random_resized_crop_scale: area fraction range of RandomResizedCrop.
            scale_jitter_range: shorter-side range of `scale_jitter` ([256, 480] in the paper).
            hflip: random horizontal flip of training crops.
            lighting_std: AlexNet PCA lighting noise std (0.1 in the paper; 0 = off).
            max_corrupt_train_images: unreadable training images skipped (each replaced by the next image, with a
                warning naming it) in the whole run, all ranks and restarts together (`<run>/skipped_images.txt`),
                before it stops; validation never skips one. A manifest's unreadable files are left out beforehand.
            pin_memory: page-locked host batches for faster copies to the GPU.
            seed: seed of the training shuffle (same on every rank, reshuffled each epoch) and, in the torchvision
                backend, of each image's augmentation: a function of (seed, epoch, image index), the same with any
                number of loader workers or ranks and after a resume.
            backend: the loader: `torchvision` (DataLoader, the reference), `dali` (NVIDIA DALI) or `ffcv`
                (.beton files written by `resnet prepare ffcv`); same crops, labels and sharding.
            dali_device: `gpu` decodes with nvJPEG and augments on the GPU, `cpu` runs the same pipeline on
                CPU threads; `auto` = gpu when the model runs on one.
            ffcv_dir: folder with `train.beton` and `val.beton`; None = `<root>/ffcv`.
            ffcv_order: training order: `random` (a full shuffle) or `quasi_random` (shuffles within
                memory-sized chunks: for datasets larger than RAM; one process only).
            ffcv_os_cache: let the OS page cache hold the .beton (fits in RAM) instead of FFCV's own reads.
            manifest: the manifest `resnet prepare check` wrote; None = the valid one in its default places, if
                any (datamodules/manifest.py), else the folders are listed (by rank 0, which sends the list).
        """
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.batch_size = batch_size
        self.classes: list[str] = []
        self.train_set: Optional[ImageFolderDataset] = None
        self.val_set: Optional[ImageFolderDataset] = None
        self.train_order: Optional[EpochOrder] = None  # made with the training loader
        self._resume_position: Optional[TrainPosition] = None  # from a checkpoint, until the loader exists
        self._dali_train = None  # the DALI training loader: its pipeline state goes into checkpoints
        self._resume_pipelines: dict = {}  # rank -> a DALI training pipeline state, from a checkpoint
        self._train_fingerprint: Optional[dict] = None  # of the training sample list (sample_fingerprint)
        self._sample_source = "folder scan"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _world(self) -> tuple[int, int]:
        return trainer_world(self.trainer)

    @property
    def per_device_batch_size(self) -> int:
        return per_device_batch_size(self.batch_size, self._world()[1])

    def setup(self, stage: str) -> None:
        _, world = self._world()
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "trainer.use_distributed_sampler must be false: ImageNetDataModule shards the data itself "
                "(Lightning's DistributedSampler pads validation with duplicate images)"
            )
        self.per_device_batch_size  # fail early on a batch that does not divide
        train_dir = self.root / "train"
        label_split = "train" if stage == "fit" or train_dir.is_dir() else "val"
        if label_split == "val":  # evaluation-only machines may hold val/ alone: its folders define the labels
            log.info("%s absent: class indices taken from the sorted folders of %s", train_dir, self.root / "val")
        hp = self.hparams
        splits = {"fit": ("train", "val"), "validate": ("val",)}.get(stage, ())
        found = load_samples(self.root, splits, label_split, hp.manifest, rank=self._world()[0])
        self.classes = found.classes
        if found.left_out.get("val"):
            bad = found.left_out["val"]
            raise DatasetLayoutError(
                f"{len(bad)} validation images are unreadable ({found.source}): {', '.join(bad[:10])}"
                f"{' ...' if len(bad) > 10 else ''}; every one counts in the accuracy: restore them (e.g. "
                f"`resnet prepare imagenet`) and rerun `resnet prepare check --root {self.root}`"
            )
        if hp.backend == "dali":
            found = without_formats_dali_lacks(found)
        if found.left_out.get("train"):
            bad = found.left_out["train"]
            log.warning("%d unreadable training images left out (%s): %s%s", len(bad), found.source,
                        ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
        if hp.backend != "torchvision" and (hp.train_augmentation != "random_resized_crop" or hp.lighting_std > 0):
            raise ValueError(
                f"data.backend={hp.backend}: data.train_augmentation={hp.train_augmentation} / data.lighting_std="
                f"{hp.lighting_std} exist in the torchvision backend only (use random_resized_crop, lighting_std 0)"
            )
        self._sample_source = found.source
        if stage == "fit":
            self._train_fingerprint = sample_fingerprint(found.splits["train"], self.root / "train")
            self.train_set = ImageFolderDataset(
                found.splits["train"],
                train_transform(
                    crop_size=hp.crop_size,
                    scale=tuple(hp.random_resized_crop_scale),
                    scale_jitter=tuple(hp.scale_jitter_range) if hp.train_augmentation == "scale_jitter" else None,
                    hflip=hp.hflip,
                    lighting_std=hp.lighting_std,
                ),
                skipped=SkippedImages(self._skip_file(), hp.max_corrupt_train_images),
                seed=hp.seed,
            )
            rank, world = self._world()
            if world > 1:  # where each rank runs and what it reads: the first thing to look at when a launch is off
                shard = -(-len(self.train_set) // world) // self.per_device_batch_size * self.per_device_batch_size
                node, local = getattr(self.trainer, "node_rank", 0), getattr(self.trainer, "local_rank", 0)
                host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
                print(f"rank {rank}/{world} (node rank {node}, local rank {local}, host {host}): {shard} of "
                      f"{len(self.train_set)} training images an epoch", flush=True)
        if stage in ("fit", "validate"):
            self.val_set = ImageFolderDataset(
                found.splits["val"],
                val_transform(crop_size=hp.crop_size, resize_size=hp.val_resize_size),
            )

    def _skip_file(self) -> Path:
        """The run's record of skipped images: in its folder, shared by its ranks and restarts. A fresh run (no
        checkpoint in the folder: a fresh fit over one is refused) starts it anew, on rank 0; the other ranks wait
        at Lightning's barrier after set-up, so no skip is recorded before."""
        run_dir = getattr(self.trainer, "default_root_dir", None) if self.trainer is not None else None
        if not run_dir:  # a DataModule used on its own: a file of its own, made at the first skip
            return Path(tempfile.gettempdir()) / f"skipped_images-{os.getpid()}-{id(self):x}.txt"
        record = Path(run_dir) / "skipped_images.txt"
        resumable = any(Path(run_dir).glob("hpc_ckpt_*.ckpt")) or any(Path(run_dir).glob("checkpoints/*.ckpt"))
        if self._world()[0] == 0 and not resumable:
            record.unlink(missing_ok=True)  # an earlier run's, e.g. one that stopped at the limit before a checkpoint
        return record

    def _loader(self, dataset: ImageFolderDataset, order: Optional[EpochOrder] = None, **kwargs) -> DataLoader:
        workers = default_num_workers(self.hparams.num_workers)
        if order is not None:
            kwargs = {"order": order, **kwargs}
        return (TrainLoader if order is not None else WorkerSafeLoader)(
            dataset,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(init_loader_worker, rank=self._world()[0]),
            **kwargs,
        )

    def _spec(self, samples: list[tuple[str, int]], train: bool = False) -> LoaderSpec:
        rank, world = self._world()
        hp = self.hparams
        order = None
        if train:  # one per training loader, at the resume position of the checkpoint Lightning restored
            order = EpochOrder(len(samples), hp.seed, rank, world, self.per_device_batch_size)
            order.resume_at(self._resume_position)
            self.train_order = order
        return LoaderSpec(
            samples=samples, rank=rank, world_size=world, batch_size=self.per_device_batch_size,
            num_workers=default_num_workers(hp.num_workers), seed=hp.seed,
            crop_size=hp.crop_size, val_resize_size=hp.val_resize_size, scale=tuple(hp.random_resized_crop_scale),
            ratio=(3 / 4, 4 / 3), hflip=hp.hflip,
            device=self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu"),
            order=order,
        )

    def _backend_loader(self, split: str):
        hp = self.hparams
        dataset = self.train_set if split == "train" else self.val_set
        spec = self._spec(dataset.samples, train=split == "train")
        if hp.backend == "dali":
            from datamodules import dali  # imported only when chosen: DALI is a large optional install

            device = hp.dali_device if hp.dali_device != "auto" else ("gpu" if spec.device.type == "cuda" else "cpu")
            if split != "train":
                return dali.val_loader(spec, device=device)
            self._dali_train = dali.train_loader(spec, device=device)
            self._dali_train.restore_pipeline(self._resume_pipelines.get(spec.rank))
            return self._dali_train
        from datamodules import ffcv

        beton = Path(hp.ffcv_dir or self.root / "ffcv") / f"{split}.beton"
        if split == "train":
            return ffcv.train_loader(spec, beton, order=hp.ffcv_order, os_cache=hp.ffcv_os_cache)
        return ffcv.val_loader(spec, beton, os_cache=hp.ffcv_os_cache)

    def train_dataloader(self) -> DataLoader:
        if self.hparams.backend != "torchvision":
            return self._backend_loader("train")
        # The order of datamodules/order.py (DistributedSampler's, also on one rank): the same shuffle for any world
        # size, resumable mid-epoch; Lightning calls set_epoch.
        return self._loader(self.train_set, order=self._spec(self.train_set.samples, train=True).order)

    def val_dataloader(self) -> DataLoader:
        if self.hparams.backend != "torchvision":
            return self._backend_loader("val")
        rank, world = self._world()
        batches = EvalShardBatchSampler(len(self.val_set), self.per_device_batch_size, rank, world)
        return self._loader(self.val_set, batch_sampler=batches)

    def state_dict(self) -> dict:
        """Stored in every checkpoint: the class names (evaluation maps a val folder to the model's outputs by them)
        and where training is in its epoch's order (`TrainPosition`), for an exact resume."""
        state: dict = {"classes": list(self.classes)}
        position = self.train_order.position() if self.train_order is not None else self._resume_position
        if position is not None:
            state["train_position"] = position.as_dict()
        if self._train_fingerprint is not None:
            state["train_samples"] = self._train_fingerprint
        if self._dali_train is not None:  # every rank's pipeline state: Lightning writes rank 0's checkpoint only
            pipelines = gather_objects(self._dali_train.pipeline_state(), self._world()[0])
            state["dali_pipelines"] = {rank: p for rank, p in pipelines.items() if p is not None}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = TrainPosition.from_dict(state_dict.get("train_position"))
        saved, now = state_dict.get("train_samples"), self._train_fingerprint
        if saved and now and saved != now and self._resume_position is not None:
            log.warning(
                "the checkpoint's training order was drawn over %d images, this run has %d (%s, crc32 %08x vs %08x): "
                "the rest of epoch %d follows the new list, so some of its images repeat and some are missed "
                "(e.g. a manifest written or gone stale mid-run)", saved["count"], now["count"], self._sample_source,
                saved["crc32"], now["crc32"], self._resume_position.epoch)
        self._resume_pipelines = state_dict.get("dali_pipelines") or {}
        if self._dali_train is not None:
            self._dali_train.restore_pipeline(self._resume_pipelines.get(self._world()[0]))
        if self.train_order is not None:  # the loader exists already: its next pass of that epoch starts there
            self.train_order.resume_at(self._resume_position)
        saved = state_dict.get("classes")
        if saved and self.classes and saved != self.classes:
            diff = sorted(set(saved) ^ set(self.classes))[:5] or "same names, another order"
            raise DatasetLayoutError(
                f"{self.root}: its {len(self.classes)} classes differ from the {len(saved)} the checkpoint was "
                f"trained on (e.g. {diff}); the model's outputs would be read as the wrong labels"
            )

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int):
        images, labels = batch
        if images.dtype == torch.uint8:  # DALI and FFCV may deliver normalised floats already
            images = normalize_batch(images, IMAGENET_MEAN, IMAGENET_STD)
        return images, labels.long()


__all__ = ["ImageNetDataModule", "EvalShardBatchSampler", "DatasetLayoutError"]
