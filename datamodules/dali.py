"""NVIDIA DALI backend: the torchvision backend's crops and sharding as one DALI pipeline graph, run on the GPU
(nvJPEG decoding fused with the random crop, GPU resize/flip/normalise) or, with the same graph, on CPU threads.

Each pass over a loader (each `iter()`) builds a fresh pipeline over the exact file list of that pass: DALI ignores
a reset mid-epoch, so an iterator that Lightning's sanity check or `limit_val_batches` left half-read would
otherwise shorten the next pass. Building one is cheap next to an epoch (milliseconds on CPU).

Training pipelines are built with DALI's pipeline checkpointing (the reader's position and every random generator's
state, a few hundred bytes a rank): `pipeline_state()` goes into each checkpoint, and a resume with the same ranks
and batch size rebuilds the interrupted pass's pipeline from it, so the rest of the epoch gets the very crops and
flips the uninterrupted run would have drawn."""

from __future__ import annotations

from typing import Iterator, Literal, Optional

import logging
from pathlib import Path

import numpy as np
import torch

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import DataNode, Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError(
        "data.backend=dali needs NVIDIA DALI: pip install -e .[dali] "
        "(or nvidia-dali-cuda120 for CUDA 12 drivers), or use data.backend=torchvision"
    ) from e

from datamodules.folder import CorruptImageError, decode
from datamodules.loaders import LoaderSpec, equal_count_batch_size
from datamodules.order import EpochOrder, TrainPosition
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

Device = Literal["cpu", "gpu"]
# Normalisation on the 0-255 scale: the same values as `normalize_batch` gives for uint8 input.
MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_STD]


def _device_id(spec: LoaderSpec, device: str) -> Optional[int]:
    """The CUDA device the pipeline runs on, or None for a CPU-only pipeline.

    Args:
        spec: the loader spec; its `device` names the model's GPU.
        device: `cpu` or `gpu`.
    """
    if device == "cpu":
        return None
    if device != "gpu":
        raise ValueError(f"data.dali.device={device!r}: expected auto, cpu or gpu")
    if not torch.cuda.is_available():
        raise ValueError("data.dali.device=gpu needs a CUDA GPU and none is visible: use data.dali.device cpu or auto")
    if spec.device.type == "cuda" and spec.device.index is not None:
        return spec.device.index
    return torch.cuda.current_device()


def _centre_crop_pos(size: DataNode, crop: int) -> DataNode:
    """crop_pos_x/y that makes DALI cut torchvision's CenterCrop window, whose start is round((size - crop) / 2)
    with Python's round-half-to-even.

    Args:
        size: the resized extent (float DataNode).
        crop: the crop extent.
    """
    room = size - crop
    half = dmath.floor(room / 2)
    odd_room, odd_half = room - 2 * half, half - 2 * dmath.floor(half / 2)
    start = half + odd_room * odd_half  # x.5 goes to the even neighbour
    # DALI places the window at pos * room (truncated or rounded): the +0.25 lands on `start` either way.
    return (start + 0.25) / dmath.max(room, 1.0)


@pipeline_def
def _graph(files: list[str], labels: list[int], *, train: bool, device: str, crop: int, resize: int,
           scale: tuple[float, float], ratio: tuple[float, float], hflip: bool):
    """Reader -> decode (random-crop fused for training) -> resize -> crop/flip/normalise, HWC float32.

    Args:
        files, labels: this pass's samples in order (the reader does not shuffle or shard: the loader does).
        train: RandomResizedCrop + flip, or resize shorter side + centre crop.
        device: `cpu` or `gpu`; the GPU graph decodes with nvJPEG (`mixed`) and resizes on the GPU.
        crop, resize: crop side; validation shorter side before the centre crop.
        scale, ratio: RandomResizedCrop area-fraction and aspect-ratio (w/h) ranges.
        hflip: mirror half of the training crops.
    """
    jpegs, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
    decoder, ops = ("mixed", "gpu") if device == "gpu" else ("cpu", "cpu")
    # torchvision's decode_image ignores EXIF orientation: so do we, for the same pixels.
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False,
            random_area=list(scale), random_aspect_ratio=list(ratio), num_attempts=10,
        )
        images = fn.resize(images, device=ops, resize_x=crop, resize_y=crop, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        pos_x = pos_y = 0.5
    else:
        shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT, adjust_orientation=False)  # (H, W, C)
        height, width = shape[0], shape[1]
        short = dmath.min(height, width)
        # torchvision's Resize truncates the longer side (DALI's resize_shorter would round it).
        new_h, new_w = dmath.floor(resize * height / short), dmath.floor(resize * width / short)
        # nvJPEG's default chroma upsampling replicates pixels; libjpeg-turbo (torchvision, DALI's CPU decoder)
        # interpolates. On 4:2:0 JPEGs that moved the 224/256 crops by ~4/255 on average, up to 100 (libjpeg-turbo's
        # own fast upsampling as the stand-in, demo textures). The CPU decoder ignores the flag.
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False,
                                   jpeg_fancy_upsampling=True)
        images = fn.resize(images, device=ops, resize_x=new_w, resize_y=new_h, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror, pos_x, pos_y = 0, _centre_crop_pos(new_w, crop), _centre_crop_pos(new_h, crop)
    images = fn.crop_mirror_normalize(
        images, device=ops, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
        mean=MEAN_255, std=STD_255, dtype=types.FLOAT, output_layout="HWC",
    )
    # Labels beside the images: on the GPU a CPU label tensor would reach the device through a copy from pageable
    # memory each step, which waits for the stream's queued work.
    return images, labels.gpu() if device == "gpu" else labels


class DaliLoader:
    """A re-iterable loader of (images, labels): images float32 NCHW normalised with IMAGENET_MEAN/STD, stored
    channels_last (DALI's HWC permuted), on the pipeline's device; labels int64 (N,). Every `iter()` is a full,
    fresh pass (and ends any pass still open), so abandoned passes never shorten the next one."""

    def __init__(self, spec: LoaderSpec, device: Device, train: bool):
        """
        Args:
            spec: this rank's view of the split and the augmentation settings.
            device: `cpu` or `gpu` (`data.dali.device`).
            train: shuffled, equal-size shards of full batches; else this rank's strided shard, once.
        """
        self.spec, self.device, self.train = spec, device, train
        self.device_id = _device_id(spec, device)
        n, world = len(spec.samples), spec.world_size
        if train:
            # The training order of datamodules/order.py (the torchvision backend's), resumable mid-epoch; Lightning
            # calls sampler.set_epoch(epoch) before each epoch. Every rank reads the same number of whole batches.
            self.sampler = spec.order or EpochOrder(n, spec.seed, spec.rank, world, spec.batch_size)
            self.batch_size = spec.batch_size
            self.num_batches = self.sampler.batches_per_epoch
            what = f"{-(-n // world)} training images per rank"
        else:
            self.batch_size = equal_count_batch_size(n, world, spec.batch_size) if n >= world else 1
            self.num_batches = -(-len(spec.samples[spec.rank::world]) // self.batch_size)
            what = f"{len(spec.samples[spec.rank::world])} validation images on rank {spec.rank}"
        if n < world or self.num_batches == 0:
            raise ValueError(f"{n} images over {world} ranks: {what}, fewer than one batch of {self.batch_size}")
        self._open: Optional[Iterator] = None
        self._iterator: Optional[DALIGenericIterator] = None  # the open training pass's, for its checkpoint
        self._list_start = 0  # the global sample the open training pipeline's file list starts at
        self._handed = 0  # batches the open training pipeline has handed out (from its list's start)
        self._restore: Optional[dict] = None  # a saved pipeline_state() for the next pass of its epoch

    def __len__(self) -> int:
        return self.num_batches

    def pass_samples(self) -> list[tuple[str, int]]:
        """The (path, label) samples this rank reads in the pass starting now, in order (training: from the resume
        position when there is one; whole batches only)."""
        if not self.train:
            return self.spec.samples[self.spec.rank::self.spec.world_size]
        return [self.spec.samples[i] for i in self._pass_indices()[0]]

    def _pass_indices(self) -> tuple[np.ndarray, Optional[str]]:
        """Begins a training pass: the indices its pipeline reads and the DALI checkpoint to build it from, if the
        saved state is of this pass. Restored, the file list is the interrupted pipeline's (from its own start) and
        the checkpoint moves its reader to where that pipeline stopped, which is where this pass starts."""
        indices = self.sampler.begin_pass()
        saved, self._restore = self._restore, None
        self._list_start, self._handed = self.sampler.pass_start, 0
        if saved is None or saved["epoch"] != self.sampler.pass_epoch or not indices.size:
            if saved is not None and saved["epoch"] > self.sampler.pass_epoch:
                self._restore = saved  # not this pass yet
            return indices, None
        same_world = (saved["world_size"], saved["batch_size"]) == (self.spec.world_size, self.batch_size)
        listed = self.sampler.indices(saved["epoch"], saved["list_start"]) if same_world else indices[:0]
        skipped = saved["batches"] * self.batch_size  # where the checkpoint leaves the reader
        if not same_world or len(listed) - len(indices) != skipped or not np.array_equal(listed[skipped:], indices):
            log.warning("DALI: the saved pipeline state (epoch %d, %d ranks x %d) is not of this pass: the rest of "
                        "epoch %d draws new crops", saved["epoch"], saved["world_size"], saved["batch_size"],
                        self.sampler.pass_epoch)
            return indices, None
        self._list_start, self._handed = saved["list_start"], saved["batches"]
        return listed, saved["checkpoint"]

    def _pipeline(self, samples: list[tuple[str, int]], checkpoint: Optional[str] = None) -> Pipeline:
        spec = self.spec
        epoch = self.sampler.pass_epoch if self.train else 0
        # Augmentation differs per rank and epoch; the shard split above depends on (seed, epoch) alone.
        seed = int(np.random.SeedSequence([spec.seed, spec.rank, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        return _graph(
            [p for p, _ in samples], [label for _, label in samples], train=self.train, device=self.device,
            crop=spec.train_crop_at(epoch) if self.train else spec.val_crop, resize=spec.val_resize_size, scale=tuple(spec.scale), ratio=tuple(spec.ratio),
            hflip=spec.hflip, batch_size=self.batch_size, num_threads=max(1, spec.num_workers),
            device_id=self.device_id, seed=seed, enable_checkpointing=self.train, checkpoint=checkpoint,
        )

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: the file list is drawn at the first next(), since Lightning calls iter() on the training
        # loader before sampler.set_epoch() in the first epoch (and after it in later ones).
        if self.train:
            indices, checkpoint = self._pass_indices()
            samples = [self.spec.samples[i] for i in indices]
        else:
            samples, checkpoint = self.pass_samples(), None
        if not samples:
            return  # a resume with more ranks left less than a batch each of this epoch
        pipe = self._pipeline(samples, checkpoint)
        # The reader's epoch is exactly this pass: PARTIAL trims the last validation batch (training passes
        # hold whole batches), instead of padding it with repeated or next-epoch samples.
        batches = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                      last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        self._iterator = batches if self.train else None
        handed = 0
        try:
            while True:
                try:
                    (out,) = next(batches)
                except StopIteration:
                    return
                except RuntimeError as e:  # DALI cannot skip a file, and its error may name none
                    # Where the reader is in `samples`: a pass rebuilt from a checkpoint starts past its head.
                    start = (self._handed if self.train else handed) * self.batch_size
                    bad = _unreadable(samples, start, self.batch_size)
                    if bad is None:  # not a file's fault that we can see (memory, a GPU fault): DALI's own error
                        raise
                    raise bad from e
                handed += 1
                if self.train:
                    self.sampler.batches_read()
                    self._handed += 1
                yield out["images"].permute(0, 3, 1, 2), out["labels"].reshape(-1).long()
        finally:
            self._iterator = None
            del batches, pipe  # free the pipeline's threads and buffers now, not at garbage collection

    def pipeline_state(self) -> Optional[dict]:
        """The open training pass's DALI checkpoint (reader position and random generators' states, as a string)
        with what it belongs to: {epoch, list_start (the global sample its file list starts at), batches (handed out
        from there), world_size, batch_size, checkpoint}; None between passes."""
        if self._iterator is None:
            return None
        return {"epoch": self.sampler.pass_epoch, "list_start": self._list_start, "batches": self._handed,
                "world_size": self.spec.world_size,
                "batch_size": self.batch_size, "checkpoint": self._iterator.checkpoints()[0]}

    def restore_pipeline(self, state: Optional[dict]) -> None:
        """The next training pass of `state["epoch"]` is rebuilt from this `pipeline_state()` (ignored, with a
        warning, where the ranks, batch size or position differ)."""
        self._restore = state if self.train else None

    def state_dict(self) -> dict:
        """Training: the position in the epoch (`TrainPosition`); a resumed loader reads the same samples in the same
        order as the uninterrupted one. (The crops' state is `pipeline_state()`, one per rank: the DataModule
        gathers them into the checkpoint.)"""
        return self.sampler.position().as_dict() if self.train else {}

    def load_state_dict(self, state: dict) -> None:
        if self.train:
            self.sampler.resume_at(TrainPosition.from_dict(state))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._open is not None:
            self._open.close()  # a pass left half-read (sanity check, limit_*_batches) ends here
        self._open = self._batches()
        return self._open


def _unreadable(samples: list[tuple[str, int]], start: int, batch_size: int) -> Optional[CorruptImageError]:
    """After a pipeline failed `start` samples into `samples`: the error naming the files of the batches DALI may
    have been preparing (its prefetch queue holds 2) that the torchvision backend's reader cannot decode, or whose
    content DALI does not decode (e.g. a GIF under a .JPEG name); None when all of them look fine."""
    from datamodules.dataset_check import content_format
    from datamodules.samples import DALI_FORMATS

    bad = []
    for path, _ in samples[start : start + 4 * batch_size]:
        try:
            decode(path)
            with open(path, "rb") as f:
                image_format = content_format(f.read(16))
            if image_format not in DALI_FORMATS:
                bad.append(f"{path}: {image_format} content, which DALI does not decode")
        except (CorruptImageError, OSError) as e:
            bad.append(str(e))
    if not bad:
        return None
    root = Path(samples[0][0]).parents[2]  # samples are <root>/<split>/<wnid>/<file>
    return CorruptImageError(
        f"DALI could not read {'; '.join(bad)}. DALI cannot skip a file at run time: `resnet prepare check --root "
        f"{root}` writes a manifest that leaves unreadable files out (or use data.backend=torchvision, which skips "
        f"them)"
    )


def train_loader(spec: LoaderSpec, device: Device = "cpu") -> DaliLoader:
    """Training loader: RandomResizedCrop (spec.scale, spec.ratio) + optional flip, shuffled per epoch.

    Args:
        spec: this rank's view of the training split.
        device: `cpu` or `gpu`.
    """
    return DaliLoader(spec, device, train=True)


def val_loader(spec: LoaderSpec, device: Device = "cpu") -> DaliLoader:
    """Validation loader: shorter side to spec.val_resize_size, centre crop; each image of the rank's shard once.

    Args:
        spec: this rank's view of the validation split.
        device: `cpu` or `gpu`.
    """
    return DaliLoader(spec, device, train=False)


__all__ = ["DaliLoader", "train_loader", "val_loader"]
