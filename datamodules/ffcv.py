"""FFCV backend: .beton files (`resnet prepare ffcv`) and their loaders, matching the torchvision backend: the same
labels, its training order (same images in the same batches, per rank and epoch), each rank's strided validation
shard once, and its validation crops pixel for pixel (`CenterCropDecoder`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from numba import njit

from datamodules.folder import DatasetLayoutError, decode, find_classes, scan_split
from datamodules.imagenet import LoaderSpec, equal_count_batch_size, usable_cpus
from datamodules.order import EpochOrder, TrainPosition

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV (ffcv.pipeline.compiler) sets torch to one CPU thread
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

META = "classes.json"  # beside the .beton files: the class list their labels index, and how each was written


def allocated_cpus() -> int:
    """CPUs this job may use: SLURM's allocation, else this process's affinity (not the whole node's cores)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return usable_cpus()


class _Images:
    """(HWC uint8 RGB, label) pairs for DatasetWriter, decoded as the torchvision backend decodes them (PNG, CMYK)."""

    def __init__(self, samples: list[tuple[str, int]], errors: Path):
        self.samples, self.errors = samples, errors

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        np.random.seed(index)  # RGBImageField's 'proportion' draw: the same images compressed on every run
        path, label = self.samples[index]
        try:
            image = decode(path).permute(1, 2, 0).numpy()
        except Exception as e:  # a raising writer process leaves DatasetWriter waiting forever: record, fail after
            with open(self.errors, "a") as f:
                f.write(f"{e}\n" if path in str(e) else f"{path}: {e}\n")
            image = np.zeros((1, 1, 3), np.uint8)
        return np.ascontiguousarray(image), label


def check_beton(beton: Path, samples: list[tuple[str, int]]) -> None:
    """Fail clearly unless `beton` holds `samples`' labels in order and its classes.json names them alike."""
    root = Path(samples[0][0]).parents[2]  # samples are <root>/<split>/<wnid>/<file>
    fix = f"resnet prepare ffcv --root {root} --dst {beton.parent}"
    if not beton.is_file():
        raise FileNotFoundError(f"{beton}: missing; write it with `{fix}`")
    meta = beton.parent / META
    if meta.is_file():  # absent for .beton files written by other tools: the label check below still holds
        saved = json.loads(meta.read_text())["classes"]
        wnids = {label: Path(path).parent.name for path, label in samples}
        wrong = [label for label, wnid in wnids.items() if label >= len(saved) or saved[label] != wnid]
        if wrong:
            there = saved[wrong[0]] if wrong[0] < len(saved) else "absent"
            raise DatasetLayoutError(
                f"label {wrong[0]} is {wnids[wrong[0]]} in {root} but {there} in {meta} ({len(saved)} classes: "
                f"{', '.join(saved[:3])}, ...): rewrite the files with `{fix} --overwrite`"
            )
    reader = Reader(str(beton))
    if reader.field_names != ["image", "label"]:
        raise DatasetLayoutError(f"{beton}: fields {reader.field_names}, not ['image', 'label']: `{fix} --overwrite`")
    labels = reader.metadata["f1"]  # metadata columns are named by position
    if not np.array_equal(labels, [label for _, label in samples]):
        raise DatasetLayoutError(
            f"{beton} holds {len(labels)} images whose labels differ from the {len(samples)} of "
            f"{root / beton.stem}: the folder changed since it was written; run `{fix} --overwrite`"
        )


def prepare_ffcv(
    root: str,
    dst: Optional[str] = None,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: Optional[int] = None,
    splits: Sequence[Literal["train", "val"]] = ("train", "val"),
    overwrite: bool = False,
) -> Path:
    """Write `train.beton` and `val.beton` for `data.backend: ffcv` from the ImageNet folder layout.

    Args:
        root: folder holding `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.
        dst: output folder; None = `<root>/ffcv` (the DataModule's default `data.ffcv_dir`).
        max_resolution: longer image side stored at most (larger images are shrunk, INTER_AREA).
        jpeg_quality: quality of the images stored re-compressed.
        compress_probability: fraction of images stored as JPEG, the rest as raw pixels (faster to decode,
            larger file; 0 = all raw, exact pixels).
        workers: writer processes; None = the CPUs allocated to this job (SLURM, else CPU affinity).
        splits: which files to write, e.g. `--splits '[val]'`.
        overwrite: rewrite existing files (else a complete file is kept).
    """
    src, out = Path(root), Path(dst) if dst else Path(root) / "ffcv"
    classes = find_classes(src / "train" if (src / "train").is_dir() else src / "val")  # labels as the DataModule's
    class_to_idx = {c: i for i, c in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / META).read_text()) if (out / META).is_file() else {}
    for split in splits:
        samples, beton = scan_split(src / split, class_to_idx), out / f"{split}.beton"
        if beton.is_file() and not overwrite:
            check_beton(beton, samples)  # kept only while it matches the folder (and the classes.json beside it)
            print(f"{beton}: kept ({len(samples)} images; --overwrite to rewrite it)", flush=True)
            continue
        print(f"{beton}: writing {len(samples)} images of {len(classes)} classes", flush=True)
        settings = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                    "compress_probability": compress_probability, "images": len(samples)}
        _write_split(samples, beton, settings, workers or allocated_cpus())
        meta["classes"], meta.setdefault("splits", {})[split] = classes, settings
        (out / f"{META}.partial").write_text(json.dumps(meta, indent=1))
        os.replace(out / f"{META}.partial", out / META)
    return out


def _write_split(samples: list[tuple[str, int]], beton: Path, settings: dict, workers: int) -> None:
    """One .beton, written under `.partial` and renamed when complete: never a truncated file under its name."""
    partial, errors = beton.with_name(beton.name + ".partial"), beton.with_name(beton.name + ".errors")
    errors.unlink(missing_ok=True)
    image = RGBImageField("proportion", settings["max_resolution"], jpeg_quality=settings["jpeg_quality"],
                          compress_probability=settings["compress_probability"])
    try:
        fields = {"image": image, "label": IntField()}
        writer = DatasetWriter(str(partial), fields, num_workers=min(workers, len(samples)))
        # Chunks small enough to give every process work on small sets; 100 (FFCV's default) on ImageNet.
        writer.from_indexed_dataset(_Images(samples, errors), chunksize=max(1, min(100, len(samples) // workers)))
        if errors.is_file():
            bad = errors.read_text().splitlines()
            raise DatasetLayoutError(f"{beton}: not written, {len(bad)} of {len(samples)} images unreadable:\n  "
                                     + "\n  ".join(bad[:10]))
        os.replace(partial, beton)
    finally:
        partial.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)


# torchvision's validation geometry in numba, bit-exact with v2.Resize(antialias=True) on uint8 (torch's
# fixed-point separable kernel: horizontal pass first, rounded to uint8, then vertical) and v2.CenterCrop.
@njit(nogil=True)
def _axis_weights(in_size: int, out_size: int):
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle filter widens when shrinking: antialiasing
    inv = 1.0 / support
    first, count = np.zeros(out_size, np.int64), np.zeros(out_size, np.int64)
    weights, wmax = np.zeros((out_size, 2 * int(math.ceil(support)) + 1)), 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        first[i] = max(int(center - support + 0.5), 0)
        count[i] = min(int(center + support + 0.5), in_size) - first[i]
        total = 0.0
        for j in range(count[i]):  # the same float operations, in the same order, as torch
            weights[i, j] = max(0.0, 1.0 - abs((j + first[i] - center + 0.5) * inv))
            total += weights[i, j]
        for j in range(count[i]):
            weights[i, j] /= total
            wmax = max(wmax, weights[i, j])
    bits = 0  # as many fraction bits as keep the largest weight in int16, as torch does
    while bits < 22 and int(0.5 + wmax * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = np.floor(weights * (1 << bits) + 0.5).astype(np.int64)
    return first, count, fixed, bits


@njit(nogil=True)
def _resample(src: np.ndarray, first: np.ndarray, count: np.ndarray, weights: np.ndarray, bits: int, out: np.ndarray):
    """One pass along the first axis: out[i, k] = sum_j src[first[i] + j, k] * weights[i, j] / 2**bits, rounded and
    clipped as torch's uint8 kernel does."""
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            a0 = a1 = a2 = np.int32(1 << (bits - 1))  # 255 x 2**bits fits: int32 runs ~1.5x faster than int64
            for j in range(count[i]):
                s, wt = first[i] + j, weights[i, j]
                a0 += np.int32(src[s, k, 0]) * wt
                a1 += np.int32(src[s, k, 1]) * wt
                a2 += np.int32(src[s, k, 2]) * wt
            out[i, k, 0], out[i, k, 1] = min(max(a0 >> bits, 0), 255), min(max(a1 >> bits, 0), 255)
            out[i, k, 2] = min(max(a2 >> bits, 0), 255)


@njit(nogil=True)
def _resize_center_crop(image: np.ndarray, resize: int, crop: int, out: np.ndarray) -> None:
    h, w = image.shape[0], image.shape[1]
    oh, ow = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    top, left = int(np.round((oh - crop) / 2.0)), int(np.round((ow - crop) / 2.0))
    yf, yc, yw, ybits = _axis_weights(h, oh)
    xf, xc, xw, xbits = _axis_weights(w, ow)
    row0, row1 = yf[top], yf[top + crop - 1] + yc[top + crop - 1]  # only the source rows the crop needs
    rows = np.empty((crop, row1 - row0, 3), np.uint8)  # horizontal pass, stored column-major
    x = slice(left, left + crop)
    _resample(image[row0:row1].transpose(1, 0, 2), xf[x], xc[x], xw[x].astype(np.int32), xbits, rows)
    y = slice(top, top + crop)
    _resample(rows.transpose(1, 0, 2), yf[y] - row0, yc[y], yw[y].astype(np.int32), ybits, out)


class CenterCropDecoder(SimpleRGBImageDecoder):  # FFCV takes a field's decoder by its class
    """RGBImageField decoder with torchvision's validation crop: shorter side to `resize_size`, then the centre
    `crop_size` square. FFCV's CenterCropRGBImageDecoder crops a fraction of the shorter side and resizes it with
    OpenCV: on the demo images (36 -> 32) its crops differ from torchvision's by 8.5 of 255 on average, up to 143."""

    def __init__(self, crop_size: int, resize_size: int):
        super().__init__()
        if crop_size > resize_size:
            raise ValueError(f"crop_size={crop_size} is larger than val_resize_size={resize_size}")
        self.crop_size, self.resize_size = crop_size, resize_size

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        out, u8 = (self.crop_size, self.crop_size, 3), np.dtype("<u1")
        pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max()) * np.uint64(3)
        # The output crop, and room to decode the largest stored image.
        state = replace(previous_state, jit_mode=True, shape=out, dtype=u8)
        return state, (AllocationQuery(out, u8), AllocationQuery((pixels,), u8))

    def generate_code(self):
        mem_read, loop, imdecode_c = self.memory_read, Compiler.get_iterator(), Compiler.compile(imdecode)
        jpg, resize, crop = IMAGE_MODES["jpg"], self.resize_size, self.crop_size

        def decode_crop(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            for k in loop(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    imdecode_c(data, scratch[k], h, w, h, w, 0, 0, 1, 1, False, False)
                    image = scratch[k][: 3 * h * w].reshape(h, w, 3)
                else:
                    image = data.reshape(h, w, 3)
                _resize_center_crop(image, resize, crop, destination[k])
            return destination[: len(batch_indices)]

        decode_crop.is_parallel = True
        return decode_crop


class ShardedShuffle(TraversalOrder):
    """The torchvision backend's order (datamodules/order.py: DistributedSampler's, resumable mid-epoch) with the
    global rank and world size given (FFCV's `distributed=True` asks torch.distributed, which may not be initialised
    yet). FFCV asks for an order when the Loader is made (its length) and at each pass: only a pass starts one."""

    def __init__(self, order: EpochOrder):  # FFCV 1.0.2 calls an order object with the loader
        self.order, self.passing = order, False

    def __call__(self, loader: Loader) -> "ShardedShuffle":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        if not self.passing:  # the Loader's constructor sizing itself: no pass, the resume position stays
            return self.indices[: self.order.batches_per_epoch * self.order.batch_size]
        self.order.set_epoch(epoch)
        return self.indices[self.order.begin_pass()]


class _Epoch:
    """`loader.sampler.set_epoch`, which Lightning calls before each epoch: the order follows the trainer's epoch,
    also after a resume, rather than FFCV's count of iterations."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch


class EpochLoader(Loader):
    """FFCV's Loader for Lightning: `sampler.set_epoch`; a pass starts at its first batch, not at `iter()` (Lightning
    creates the training iterator before `set_epoch` on a resume); a new pass (validation after the sanity check)
    first stops an unfinished one, whose thread FFCV leaves blocked; torch's thread count (FFCV sets it) is kept.
    Training loaders are resumable mid-epoch (`state_dict`, `load_state_dict`: a `TrainPosition`)."""

    def __init__(self, *args, **kwargs):
        threads = torch.get_num_threads()
        super().__init__(*args, **kwargs)
        torch.set_num_threads(threads)
        # Lightning reads `batch_sampler` wherever a loader has a `sampler`.
        self.sampler, self.batch_sampler, self._running = _Epoch(self), None, None
        self.order = self.traversal_order.order if isinstance(self.traversal_order, ShardedShuffle) else None
        if self.order is not None:
            self.traversal_order.passing = True

    def __len__(self) -> int:
        return self.order.batches_per_epoch if self.order is not None else super().__len__()

    def state_dict(self) -> dict:
        return self.order.position().as_dict() if self.order is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.order is not None:
            self.order.resume_at(TrainPosition.from_dict(state))

    def _stop(self) -> None:
        if self._running is None:
            return
        # Stop it before another thread enters numba's parallel kernels.
        self._running.terminate_event.set()
        while self._running.is_alive():  # it may be blocked putting a batch or its end mark into a full queue
            with contextlib.suppress(queue.Empty):
                self._running.output_queue.get(timeout=0.1)
        self._running.close()
        # With ToDevice, each batch was copied on one of FFCV's CUDA streams into pinned host and device buffers
        # that are freed with this iterator; a copy queued behind the model's work may still be pending (a pass
        # left half read). Wait for them before the next pass's buffers can reuse that memory.
        for stream in self._running.cuda_streams:
            if stream is not None:
                stream.synchronize()
        self._running = None

    def __iter__(self):
        return self._pass()

    def _pass(self):
        self._stop()
        threads = torch.get_num_threads()
        self._running = running = super().__iter__()
        torch.set_num_threads(threads)
        for batch in running:
            if self.order is not None:
                self.order.batches_read()
            yield batch


def _pipelines(image_ops: list, device: torch.device) -> dict[str, list]:
    """Images: numba ops, then torch ones (a numba op after a torch one hangs the Loader, ffcv issue #396); uint8
    NCHW channels_last, normalised on the device by the DataModule (1/4 of float32's bytes). Labels: int64 (N,)."""
    to_gpu = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []  # FFCV's async copy
    return {
        "image": [*image_ops, ToTensor(), *to_gpu, ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_gpu],  # IntDecoder gives (N, 1)
    }


def train_loader(
    spec: LoaderSpec, beton: str | Path, order: Literal["random", "quasi_random"] = "random", os_cache: bool = True
) -> EpochLoader:
    """RandomResizedCrop (OpenCV resize) and flip, uint8 NCHW batches of `spec.batch_size`, in the torchvision
    backend's order; the last partial batch is dropped.

    Args:
        spec: the DataModule's LoaderSpec for the training split.
        beton: `train.beton` written by `resnet prepare ffcv`.
        order: `random`, or `quasi_random` (FFCV's page-local shuffle for data larger than RAM; one process).
        os_cache: read through the OS page cache (else FFCV's own page reads).
    """
    beton = Path(beton)
    check_beton(beton, spec.samples)
    if order == "quasi_random" and spec.world_size > 1:
        raise ValueError(f"data.ffcv_order=quasi_random: FFCV has it for one process only, not {spec.world_size}")
    decoder = RandomResizedCropRGBImageDecoder((spec.crop_size, spec.crop_size), tuple(spec.scale), tuple(spec.ratio))
    return EpochLoader(
        str(beton), batch_size=spec.batch_size, num_workers=max(1, spec.num_workers), os_cache=os_cache,
        order=OrderOption.QUASI_RANDOM if order == "quasi_random" else ShardedShuffle(
            spec.order or EpochOrder(len(spec.samples), spec.seed, spec.rank, spec.world_size, spec.batch_size)),
        seed=spec.seed, drop_last=True,
        pipelines=_pipelines([decoder, *([RandomHorizontalFlip()] if spec.hflip else [])], spec.device),
    )


def val_loader(spec: LoaderSpec, beton: str | Path, os_cache: bool = True) -> EpochLoader:
    """This rank's strided shard (rank, rank + world, ...), each image once, cropped as torchvision's val transform;
    the same number of batches on every rank (`equal_count_batch_size`).

    Args:
        spec: the DataModule's LoaderSpec for the validation split.
        beton: `val.beton` written by `resnet prepare ffcv`.
        os_cache: read through the OS page cache (else FFCV's own page reads).
    """
    beton = Path(beton)
    check_beton(beton, spec.samples)
    n = len(spec.samples)  # FFCV's distributed mode would pad the shard and drop the last batch: indices instead
    return EpochLoader(
        str(beton), batch_size=equal_count_batch_size(n, spec.world_size, spec.batch_size),
        num_workers=max(1, spec.num_workers), os_cache=os_cache, order=OrderOption.SEQUENTIAL, drop_last=False,
        indices=np.arange(spec.rank, n, spec.world_size),
        pipelines=_pipelines([CenterCropDecoder(spec.crop_size, spec.val_resize_size)], spec.device),
    )
