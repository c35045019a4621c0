"""ImageNet-folder DataModule: global batch split over ranks, each validation image counted exactly once."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import torch

from datamodules.backends import BACKENDS, BackendName, DaliOptions, FfcvOptions, LoaderBackend
from datamodules.loaders import EvalShardBatchSampler, LoaderSpec, default_num_workers, per_device_batch_size, trainer_world
from datamodules.order import EpochOrder, TrainPosition
from datamodules.folder import DatasetLayoutError, ImageFolderDataset, SkippedImages
from datamodules.samples import load_samples, sample_fingerprint
from datamodules.transforms import (IMAGENET_MEAN, IMAGENET_STD, EpochTransform, ProgressiveResizing, normalize_batch,
                                    train_transform, val_transform)

log = logging.getLogger(__name__)


class ImageNetDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        num_workers: Optional[int] = None,
        crop_size: int = 224,
        val_resize_size: int = 256,
        val_crop_size: Optional[int] = None,
        progressive_resizing: Optional[ProgressiveResizing] = None,
        train_augmentation: Literal["random_resized_crop", "scale_jitter"] = "random_resized_crop",
        random_resized_crop_scale: tuple[float, float] = (0.08, 1.0),
        scale_jitter_range: tuple[int, int] = (256, 480),
        hflip: bool = True,
        lighting_std: float = 0.0,
        trivial_augment: bool = False,
        random_erasing: float = 0.0,
        repeated_augmentation: int = 1,
        max_corrupt_train_images: int = 16,
        pin_memory: bool = True,
        seed: int = 0,
        backend: BackendName = "torchvision",
        dali: DaliOptions = DaliOptions(),
        ffcv: FfcvOptions = FfcvOptions(),
        manifest: Optional[str] = None,
        stage_dir: Optional[str] = None,
    ):
        """
        Args:
            root: folder holding `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.
            batch_size: global batch (all ranks together); each rank loads batch_size / world_size.
            num_workers: loader processes per rank; None = the CPUs this process may use, at most 8.
            crop_size: side of the square training crops, and of validation's unless val_crop_size is set.
            val_resize_size: validation shorter side before the centre crop (256 for 224 crops).
            val_crop_size: side of the validation centre crop; None = crop_size. Training at a lower resolution
                than testing (Touvron et al. 2019): torchvision's V2 recipe trains at 176 and tests 232 -> 224.
            progressive_resizing: the training crop side by epoch (min_size, max_size, start_epoch, end_epoch:
                FFCV's rule, datamodules/transforms.py); every backend follows it. None = crop_size throughout.
            train_augmentation: `random_resized_crop` (torchvision) or `scale_jitter` (He et al. 2015).
            random_resized_crop_scale: area fraction range of RandomResizedCrop.
            scale_jitter_range: shorter-side range of `scale_jitter` ([256, 480] in the paper).
            hflip: random horizontal flip of training crops.
            lighting_std: AlexNet PCA lighting noise std (0.1 in the paper; 0 = off).
            trivial_augment: TrivialAugmentWide after the crop and flip (torchvision's V2 recipe); torchvision
                backend only.
            random_erasing: probability of RandomErasing a box of each training crop (0.1 in torchvision's V2
                recipe); torchvision backend only.
            repeated_augmentation: copies of each sampled image in an epoch, each augmented on its own,
                consecutive in the order the ranks deal out (Hoffer et al. 2020, Berman et al. 2019; torchvision's
                --ra-reps, 4 in its V2 recipe); an epoch keeps its number of steps, so it holds about
                1 / repeated_augmentation of the distinct images (datamodules/order.py). 1 = off. Every backend but
                FFCV's quasi_random order; the torchvision backend draws each copy's crop from (seed, epoch, index,
                copy).
            max_corrupt_train_images: unreadable training images skipped (each replaced by the next image, with a
                warning naming it) in the whole run, all ranks and restarts together (`<run>/skipped_images.txt`),
                before it stops; validation never skips one. A manifest's unreadable files are left out beforehand.
            pin_memory: page-locked host batches for faster copies to the GPU.
            seed: seed of the training shuffle (same on every rank, reshuffled each epoch) and, in the torchvision
                backend, of each image's augmentation: a function of (seed, epoch, image index), the same with any
                number of loader workers or ranks and after a resume.
            backend: the loader, by its name in datamodules/backends: `torchvision` (DataLoader, the reference),
                `dali` (NVIDIA DALI) or `ffcv` (.beton files written by `resnet prepare ffcv`); same crops, labels
                and sharding.
            dali: the DALI backend's options (`--data.dali.device gpu`; DaliOptions).
            ffcv: the FFCV backend's options (`--data.ffcv.dir`, `.order`, `.os_cache`; FfcvOptions).
            manifest: the manifest `resnet prepare check` wrote; None = the valid one in its default places, if
                any (datamodules/manifest.py), else the folders are listed (by rank 0, which sends the list).
            stage_dir: a node-local folder (NVMe scratch, `$TMPDIR`; variables expanded on each node) to copy what
                the run reads to before it starts, once per node: the .beton files (ffcv) or the usable images of
                train/ and val/; size and SHA-256 checked, reused after a requeue while valid
                (datamodules/staging.py). None = read the data where it is.
        """
        super().__init__()
        if repeated_augmentation < 1:
            raise ValueError(f"data.repeated_augmentation={repeated_augmentation}: copies of each image in an epoch, "
                             "at least 1 (1 = off; 4 in torchvision's V2 recipe)")
        self.save_hyperparameters()
        self.root = Path(root)
        if backend not in BACKENDS:  # the command line's schema (BackendName) checks it; Python callers get this
            raise ValueError(f"data.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        # Backend options as plain dicts in hparams, checkpoints (torch.load(weights_only=True)) and the loggers'
        # hparams.yaml (safe_load): a dataclass given by Python code is converted.
        plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in self.hparams.items()}
        if plain != dict(self.hparams):
            self.save_hyperparameters(plain)
        kind = BACKENDS[backend]
        try:
            options = kind.options(**self.hparams[backend]) if kind.options is not None else None  # data.<backend>
        except TypeError as e:  # a key the dataclass lacks, from Python code
            raise ValueError(f"data.{backend}={self.hparams[backend]}: {e}") from None
        self.loaders: LoaderBackend = kind(self, options) if options is not None else kind(self)
        self.loaders.check(dict(self.hparams))
        self.batch_size = batch_size
        self.classes: list[str] = []
        self.train_set: Optional[ImageFolderDataset] = None
        self.val_set: Optional[ImageFolderDataset] = None
        self.train_order: Optional[EpochOrder] = None  # made with the training loader
        self._resume_position: Optional[TrainPosition] = None  # from a checkpoint, until the loader exists
        self._train_fingerprint: Optional[dict] = None  # of the training sample list (sample_fingerprint)
        self._sample_source = "folder scan"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _world(self) -> tuple[int, int]:
        return trainer_world(self.trainer)

    @property
    def trainer_rank(self) -> int:
        """This process's global rank (0 without a trainer)."""
        return self._world()[0]

    @property
    def per_device_batch_size(self) -> int:
        return per_device_batch_size(self.batch_size, self._world()[1])

    def _staged(self, stage: str, check: bool) -> Path:
        """The node-local copy of what `stage` reads (made, checked or, with check=False, found)."""
        from datamodules import staging

        hp = self.hparams
        plan = self.loaders.stage_plan(self.root, stage, hp.stage_dir, hp.manifest)
        staged = staging.stage(plan, check=check)
        if check:
            print(staging.describe(staged, plan), flush=True)
        return staged.root

    def prepare_data(self) -> None:
        """With `stage_dir`: the node-local copy, made or checked by each node's local rank 0 (Lightning calls this
        hook there: prepare_data_per_node); the node's other ranks wait at Lightning's barrier."""
        if self.hparams.stage_dir:
            fn = getattr(getattr(self.trainer, "state", None), "fn", None)
            self._staged(getattr(fn, "value", "fit"), check=True)

    def setup(self, stage: str) -> None:
        _, world = self._world()
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "trainer.use_distributed_sampler must be false: ImageNetDataModule shards the data itself "
                "(Lightning's DistributedSampler pads validation with duplicate images)"
            )
        self.per_device_batch_size  # fail early on a batch that does not divide
        hp = self.hparams
        root, manifest = self.root, hp.manifest
        if hp.stage_dir:
            root, manifest = self.loaders.use_staged(self._staged(stage, check=False), root, manifest)
        train_dir = root / "train"
        label_split = "train" if stage == "fit" or train_dir.is_dir() else "val"
        if label_split == "val":  # evaluation-only machines may hold val/ alone: its folders define the labels
            log.info("%s absent: class indices taken from the sorted folders of %s", train_dir, root / "val")
        splits = {"fit": ("train", "val"), "validate": ("val",)}.get(stage, ())
        found = load_samples(root, splits, label_split, manifest, rank=self._world()[0])
        self.classes = found.classes
        if found.left_out.get("val"):
            bad = found.left_out["val"]
            raise DatasetLayoutError(
                f"{len(bad)} validation images are unreadable ({found.source}): {', '.join(bad[:10])}"
                f"{' ...' if len(bad) > 10 else ''}; every one counts in the accuracy: restore them (e.g. "
                f"`resnet prepare imagenet`) and rerun `resnet prepare check --root {self.root}`"
            )
        found = self.loaders.usable(found)
        if found.left_out.get("train"):
            bad = found.left_out["train"]
            log.warning("%d unreadable training images left out (%s): %s%s", len(bad), found.source,
                        ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
        self._sample_source = found.source
        if stage == "fit":
            self._train_fingerprint = sample_fingerprint(found.splits["train"], root / "train")
            augment = dict(
                scale=tuple(hp.random_resized_crop_scale),
                scale_jitter=tuple(hp.scale_jitter_range) if hp.train_augmentation == "scale_jitter" else None,
                hflip=hp.hflip, lighting_std=hp.lighting_std, trivial_augment=hp.trivial_augment,
                random_erasing=hp.random_erasing,
            )
            self.train_set = ImageFolderDataset(
                found.splits["train"],
                EpochTransform(self._resizing(), **augment) if self._resizing() else train_transform(
                    crop_size=hp.crop_size, **augment),
                skipped=SkippedImages(self._skip_file(), hp.max_corrupt_train_images),
                seed=hp.seed,
            )
            rank, world = self._world()
            if world > 1:  # where each rank runs and what it reads: the first thing to look at when a launch is off
                shard = -(-len(self.train_set) // world) // self.per_device_batch_size * self.per_device_batch_size
                node, local = getattr(self.trainer, "node_rank", 0), getattr(self.trainer, "local_rank", 0)
                host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
                where = self.loaders.data_dir(root)
                print(f"rank {rank}/{world} (node rank {node}, local rank {local}, host {host}): {shard} of "
                      f"{len(self.train_set)} training images an epoch, read from {where}", flush=True)
        if stage in ("fit", "validate"):
            self.val_set = ImageFolderDataset(
                found.splits["val"],
                val_transform(crop_size=hp.val_crop_size or hp.crop_size, resize_size=hp.val_resize_size),
            )

    def _resizing(self) -> Optional[ProgressiveResizing]:
        value = self.hparams.progressive_resizing
        return ProgressiveResizing(**value) if isinstance(value, dict) else value

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

    def _spec(self, samples: list[tuple[str, int]], train: bool = False) -> LoaderSpec:
        rank, world = self._world()
        hp = self.hparams
        order = None
        if train:  # one per training loader, at the resume position of the checkpoint Lightning restored
            order = EpochOrder(len(samples), hp.seed, rank, world, self.per_device_batch_size, hp.repeated_augmentation)
            order.resume_at(self._resume_position)
            self.train_order = order
        return LoaderSpec(
            samples=samples, rank=rank, world_size=world, batch_size=self.per_device_batch_size,
            num_workers=default_num_workers(hp.num_workers), seed=hp.seed,
            crop_size=hp.crop_size, val_resize_size=hp.val_resize_size, scale=tuple(hp.random_resized_crop_scale),
            ratio=(3 / 4, 4 / 3), hflip=hp.hflip,
            device=self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu"),
            order=order, val_crop_size=hp.val_crop_size, resizing=self._resizing(),
        )

    def train_dataloader(self):
        return self.loaders.train_loader(self._spec(self.train_set.samples, train=True), self.train_set)

    def val_dataloader(self):
        return self.loaders.val_loader(self._spec(self.val_set.samples), self.val_set)

    def state_dict(self) -> dict:
        """Stored in every checkpoint: the class names (evaluation maps a val folder to the model's outputs by them)
        and where training is in its epoch's order (`TrainPosition`), for an exact resume."""
        state: dict = {"classes": list(self.classes)}
        position = self.train_order.position() if self.train_order is not None else self._resume_position
        if position is not None:
            state["train_position"] = position.as_dict()
        if self._train_fingerprint is not None:
            state["train_samples"] = self._train_fingerprint
        state.update(self.loaders.state_dict())
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
        self.loaders.load_state_dict(state_dict)
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
