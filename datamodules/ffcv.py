"""FFCV backend: loaders over .beton files (written by `resnet prepare ffcv`: datamodules/ffcv_write.py), matching
the torchvision backend: the same labels, its training order (same images in the same batches, per rank and
epoch), each rank's strided validation shard once, and its validation crops pixel for pixel (`CenterCropDecoder`)."""

from __future__ import annotations

import contextlib
import math
import queue
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from numba import njit

from datamodules.ffcv_write import check_beton
from datamodules.loaders import LoaderSpec, equal_count_batch_size
from datamodules.order import EpochOrder, TrainPosition

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV (ffcv.pipeline.compiler) sets torch to one CPU thread
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

# torchvision's validation geometry in numba, bit-exact with v2.Resize(antialias=True) on uint8 (torch's
# fixed-point separable kernel: horizontal pass first, rounded to uint8, then vertical) and v2.CenterCrop.
# cache=True: compiled once into __pycache__ (numba's user-wide cache where that is read-only), not in every process
# that makes a validation loader (~4 s of a 2-core machine's start-up, 2026-12-07).
@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
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


# A pass's thread ends after the batch it is decoding: seconds even for a batch of 1,024 ImageNet images.
STOP_TIMEOUT_S = 300


class EpochLoader(Loader):
    """FFCV's Loader for Lightning: `sampler.set_epoch`; a pass starts at its first batch, not at `iter()` (Lightning
    creates the training iterator before `set_epoch` on a resume); a new pass (validation after the sanity check)
    first stops an unfinished one, whose thread FFCV leaves blocked; torch's thread count (FFCV sets it) is kept.
    Training loaders are resumable mid-epoch (`state_dict`, `load_state_dict`: a `TrainPosition`)."""

    def __init__(self, *args, resize: Optional[tuple] = None, **kwargs):
        threads = torch.get_num_threads()
        super().__init__(*args, **kwargs)
        self._resize = resize  # (the crop decoder, epoch -> crop side): progressive resizing
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
        # FFCV's thread looks at `terminate_event` only while the queue stays full, which draining it prevents: with
        # no batches left to take, it ends after the batch it is decoding instead of decoding the rest of the pass.
        self._running.iter_ixes = iter(())
        self._running.terminate_event.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._running.is_alive():  # it may be blocked putting a batch or its end mark into a full queue
            if time.monotonic() > deadline:
                raise RuntimeError(f"FFCV: the previous pass over {self.fname} did not stop within {STOP_TIMEOUT_S} s "
                                   "(its thread is still decoding a batch); no new pass was started")
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
        if self._resize is not None:
            decoder, crop_at = self._resize
            decoder.output_size = (crop_at(self.next_epoch),) * 2
        threads = torch.get_num_threads()
        self._running = running = super().__iter__()
        torch.set_num_threads(threads)
        for batch in _batches(running, self.fname):
            if self.order is not None:
                self.order.batches_read()
            yield batch


def _batches(running, fname: str):
    """A pass's batches as FFCV's `EpochIterator.__next__` hands them out, without its unbounded wait: the decoding
    thread puts no end mark when it dies of an exception (a numba error decoding a damaged record), and `__next__`
    would then wait forever. Raises RuntimeError naming the file once that thread has ended and left nothing."""
    batches = 0
    while True:
        try:
            item = running.output_queue.get(timeout=1.0)
        except queue.Empty:
            if running.is_alive() or not running.output_queue.empty():
                continue
            running.close()
            raise RuntimeError(f"FFCV: the thread decoding {fname} ended after {batches} batches of the pass without "
                               "finishing it (its exception is printed above)") from None
        if item is None:  # the end mark
            running.close()
            return
        slot, batch = item
        if running.cuda_streams[slot] is not None:  # on a CUDA machine: wait for this batch's stream, as __next__ does
            running.current_stream.wait_stream(running.cuda_streams[slot])
        batches += 1
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
        raise ValueError(f"data.ffcv.order=quasi_random: FFCV has it for one process only, not {spec.world_size}")
    decoder = RandomResizedCropRGBImageDecoder((spec.crop_size, spec.crop_size), tuple(spec.scale), tuple(spec.ratio))
    return EpochLoader(
        str(beton), batch_size=spec.batch_size, num_workers=max(1, spec.num_workers), os_cache=os_cache,
        # Progressive resizing: each pass sets the decoder's output size. No `recompile`: the compiled pipeline takes
        # its buffers from each pass's allocation, so it is the same code at every size; FFCV's recompile spent ~5 s
        # of numba compilation on every pass, validation included, on 2 CPU cores.
        resize=(decoder, spec.train_crop_at) if spec.resizing is not None else None,
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
        pipelines=_pipelines([CenterCropDecoder(spec.val_crop, spec.val_resize_size)], spec.device),
    )
