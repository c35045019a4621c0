"""Writing FFCV `.beton` files (`resnet prepare ffcv`) from the ImageNet folder layout, and checking that a
.beton still matches its folder (labels in order, classes.json's class names)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import time
from multiprocessing import Process, Queue
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from datamodules.folder import DatasetLayoutError, decode
from datamodules.samples import load_samples
from datamodules.loaders import usable_cpus
from datamodules.prepare_io import disk_full

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV (ffcv.pipeline.compiler) sets torch to one CPU thread
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.memory_allocator import MemoryAllocator  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.types import ALLOC_TABLE_TYPE  # noqa: E402
from ffcv.utils import chunks  # noqa: E402
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE, DatasetWriter, handle_sample  # noqa: E402
from tqdm import tqdm  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

META = "classes.json"  # beside the .beton files: the class list their labels index, and how each was written
DEFAULT_PAGE = 4 * MIN_PAGE_SIZE  # DatasetWriter's default, 8 MiB: a raw image of up to 1672x1672 fits
# No image finished in any writer process for this long: a hung read (a dead network mount), not a slow image (the
# largest ImageNet images decode and shrink in well under a second).
STALL_S = 600.0


def allocated_cpus() -> int:
    """CPUs this job may use: SLURM's allocation, else this process's affinity (not the whole node's cores)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return usable_cpus()


class _Images:
    """(HWC uint8 RGB, label) pairs for DatasetWriter, decoded as the torchvision backend decodes them (PNG, CMYK)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        np.random.seed(index)  # RGBImageField's 'proportion' draw: the same images compressed on every run
        path, label = self.samples[index]
        return np.ascontiguousarray(decode(path).permute(1, 2, 0).numpy()), label


class DamagedBetonError(DatasetLayoutError):
    """A .beton that FFCV cannot read whole: cut short or damaged (an interrupted copy, a disk that filled).
    `damage` says what is wrong with it; the message adds the command that writes it again."""

    def __init__(self, damage: str, fix: str):
        super().__init__(f"{damage}: `{fix}` writes it again")
        self.damage = damage


def check_beton(beton: Path, samples: list[tuple[str, int]]) -> None:
    """Fail clearly unless `beton` holds `samples`' labels in order and its classes.json names them alike."""
    root = Path(samples[0][0]).parents[2]  # samples are <root>/<split>/<wnid>/<file>
    fix_all = f"resnet prepare ffcv --root {root} --dst {beton.parent}"
    fix = f"{fix_all} --splits '[{beton.stem}]'"  # that file alone
    if not beton.is_file():
        raise DatasetLayoutError(f"{beton}: missing; write it with `{fix}`")
    meta = beton.parent / META
    if meta.is_file():  # absent for .beton files written by other tools: the label check below still holds
        saved = json.loads(meta.read_text())["classes"]
        wnids = {label: Path(path).parent.name for path, label in samples}
        wrong = [label for label, wnid in wnids.items() if label >= len(saved) or saved[label] != wnid]
        if wrong:
            there = saved[wrong[0]] if wrong[0] < len(saved) else "absent"
            raise DatasetLayoutError(
                f"label {wrong[0]} is {wnids[wrong[0]]} in {root} but {there} in {meta} ({len(saved)} classes: "
                f"{', '.join(saved[:3])}, ...): rewrite the files with `{fix_all} --overwrite`"
            )
    size = beton.stat().st_size
    damaged = f"{beton}: damaged or cut short ({size:,} bytes: a copy or a write that did not finish)"
    try:
        reader = Reader(str(beton))
    except Exception as e:  # FFCV's reader fails on such a file with numpy's errors (IndexError, ValueError, ...)
        raise DamagedBetonError(f"{damaged}, FFCV cannot read it ({type(e).__name__}: {e})", fix) from e
    if reader.field_names != ["image", "label"]:
        raise DatasetLayoutError(f"{beton}: fields {reader.field_names}, not ['image', 'label']: `{fix} --overwrite`")
    # A .beton ends with its allocation table (one row per stored image): a file cut anywhere loses rows of it, which
    # FFCV's reader does not notice (the images without a row fail, or are read as another's bytes, in training).
    table = reader.alloc_table
    if size != reader.header["alloc_table_ptr"] + table.nbytes or not np.isin(
            np.arange(reader.num_samples), table["sample_id"]).all():
        raise DamagedBetonError(f"{damaged}: it holds {reader.num_samples} images but the data of only "
                                f"{np.unique(table['sample_id']).size}", fix)
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
    manifest: Optional[str] = None,
) -> Path:
    """Write `train.beton` and `val.beton` for `data.backend: ffcv` from the ImageNet folder layout.

    Args:
        root: folder holding `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.
        dst: output folder; None = `<root>/ffcv` (the DataModule's default `data.ffcv.dir`).
        max_resolution: longer image side stored at most (larger images are shrunk, INTER_AREA).
        jpeg_quality: quality of the images stored re-compressed.
        compress_probability: fraction of images stored as JPEG, the rest as raw pixels (faster to decode,
            larger file; 0 = all raw, exact pixels).
        workers: writer processes; None = the CPUs allocated to this job (SLURM, else CPU affinity).
        splits: which files to write, e.g. `--splits '[val]'`.
        overwrite: rewrite existing files (else a complete file is kept).
        manifest: the manifest of `resnet prepare check` (None = the valid one in its default places, if any):
            its usable images are written, the unreadable ones left out, as the DataModule reads them.
    """
    src, out = Path(root), Path(dst) if dst else Path(root) / "ffcv"
    # The samples and labels the DataModule reads: from the manifest, else the folders (hidden files never).
    found = load_samples(src, splits, "train" if (src / "train").is_dir() else "val", manifest)
    classes = found.classes
    for split, bad in found.left_out.items():
        if bad:
            print(f"{split}: {len(bad)} unreadable images left out ({found.source})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / META).read_text()) if (out / META).is_file() else {}
    for split in splits:
        samples, beton = found.splits[split], out / f"{split}.beton"
        if beton.is_file() and not overwrite:
            try:
                check_beton(beton, samples)  # kept only while it matches the folder (and the classes.json beside it)
                print(f"{beton}: kept ({len(samples)} images; --overwrite to rewrite it)", flush=True)
                continue
            except DamagedBetonError as e:  # nothing in it to keep: written again
                print(f"{e.damage}: writing it again", flush=True)
        print(f"{beton}: writing {len(samples)} images of {len(classes)} classes", flush=True)
        settings = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                    "compress_probability": compress_probability, "images": len(samples)}
        _write_split(samples, beton, settings, workers or allocated_cpus())
        meta["classes"], meta.setdefault("splits", {})[split] = classes, settings
        (out / f"{META}.partial").write_text(json.dumps(meta, indent=1))
        os.replace(out / f"{META}.partial", out / META)
    return out


def _write_split(samples: list[tuple[str, int]], beton: Path, settings: dict, workers: int) -> None:
    """One .beton, written under `.partial` and renamed when complete: never a truncated file under its name.

    Raises:
        DatasetLayoutError: images that could not be stored (undecodable, too large for a page), each by path.
        ChildProcessError: a writer process died (killed, out of memory) or made no progress for `STALL_S`.
    """
    partial, errors = beton.with_name(beton.name + ".partial"), beton.with_name(beton.name + ".errors")
    errors.unlink(missing_ok=True)
    page = _page_size(settings["max_resolution"])
    if page > DEFAULT_PAGE:  # the loaders' os_cache=False mode holds pages of this size in memory
        print(f"{beton}: {page >> 20} MiB pages, to hold raw images of {settings['max_resolution']} pixels a side",
              flush=True)
    image = RGBImageField("proportion", settings["max_resolution"], jpeg_quality=settings["jpeg_quality"],
                          compress_probability=settings["compress_probability"])
    try:
        writer = _Writer(str(partial), {"image": image, "label": IntField()}, page, min(workers, len(samples)))
        # Chunks small enough to give every process work on small sets; 100 (FFCV's default) on ImageNet.
        writer.write(_Images(samples), max(1, min(100, len(samples) // workers)), errors, beton)
        if errors.is_file():
            bad = errors.read_text().splitlines()
            root = Path(samples[0][0]).parents[2]  # samples are <root>/<split>/<wnid>/<file>
            raise DatasetLayoutError(f"{beton}: not written, {len(bad)} of {len(samples)} images unreadable:\n  "
                                     + "\n  ".join(bad[:10]) + f"\n`resnet prepare check --root {root}` writes a "
                                     "manifest that leaves unreadable images out; then run this again")
        os.replace(partial, beton)
    finally:
        partial.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)


def _page_size(max_resolution: int) -> int:
    """The smallest FFCV page (a power of two, from the default 8 MiB) that holds a raw max_resolution² image: in
    a smaller one such an image fails in its writer process. Capped at FFCV's largest, 2 GiB (max_resolution 26754):
    an image still larger is named in the DatasetLayoutError."""
    raw = 3 * max_resolution**2
    return min(max(DEFAULT_PAGE, 1 << (raw - 1).bit_length()), MAX_PAGE_SIZE // 2)


class _Writer(DatasetWriter):
    """FFCV's DatasetWriter with supervised processes. FFCV's own `from_indexed_dataset` waits for a count of written
    images that a raising or killed process never reaches (and its other processes spin forever waiting to write
    after the page the dead one booked): it hangs on any failure. Here each image's failure is recorded under its
    path, and the parent watches its processes' exit codes and progress, ending them all on a failure."""

    def write(self, dataset: _Images, chunksize: int, errors: Path, beton: Path) -> None:
        """Write `dataset` into `self.fname`; image failures go to `errors`, one line each, `beton` names the file
        in errors (ChildProcessError, see `_write_split`)."""
        self.num_samples = len(dataset)
        self.prepare()  # FFCV's: the header and fields into the file, the metadata's shared memory
        work: Queue = Queue()
        processes: list[Process] = []
        try:
            for chunk in chunks(list(enumerate(range(len(dataset)))), chunksize):
                work.put(chunk)
            for _ in range(self.num_workers):
                work.put(None)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            # One slot per process, written by it alone: no lock for a killed process to die holding.
            in_flight, done = RawArray("q", [-1] * self.num_workers), RawArray("q", self.num_workers)
            with tempfile.TemporaryDirectory(prefix="ffcv-write-") as tables:
                args = (in_flight, done, str(errors), tables, work, self.metadata_sm, self.metadata_type, self.fields,
                        allocator, dataset)
                processes = [Process(target=_write_chunks, args=(slot, *args)) for slot in range(self.num_workers)]
                for process in processes:
                    process.start()
                _supervise(processes, in_flight, done, dataset, beton)
                # Each allocation table read from a file once its process has exited: never a wait on a queue
                # that a killed process left half-written.
                allocations = [row for slot in range(self.num_workers)
                               for row in np.load(os.path.join(tables, f"{slot}.npy")).tolist()]
            self.finalize(allocations)  # FFCV's: the metadata, the allocation table and the header into the file
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
            work.cancel_join_thread()  # chunks no process will read: not fed into the pipe at exit
            work.close()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


DISK_FULL_EXIT = errno.ENOSPC  # a writer process's exit status when the file system (or quota) is full


def _write_chunks(slot: int, in_flight, done, errors: str, tables: str, work: Queue, metadata_sm, metadata_type,
                  fields: dict, allocator: MemoryAllocator, dataset: _Images) -> None:
    """One writer process: FFCV's `worker_job_indexed_dataset`, plus the image in hand and the count done in its
    slots, each image's failure recorded under its path (then the next image: the file is deleted after the
    write), and the allocation table saved to `tables/<slot>.npy`."""
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    try:
        with allocator:  # its exit writes this process's last page into the file
            for chunk in iter(work.get, None):
                for dest_ix, source_ix in chunk:
                    in_flight[slot] = source_ix
                    try:
                        handle_sample(dataset[source_ix], dest_ix, metadata_type.names, metadata, allocator, fields)
                    except Exception as e:  # decode, encode or a page too small: FFCV would leave its writer waiting
                        if disk_full(e) is not None:  # a page that did not fit on the disk: not this image's fault
                            raise
                        path = dataset.samples[source_ix][0]
                        with open(errors, "a") as f:
                            f.write(f"{e}\n" if path in str(e) else f"{path}: {type(e).__name__}: {e}\n")
                    done[slot], in_flight[slot] = done[slot] + 1, -1  # -1 while between images or writing its page
        np.save(os.path.join(tables, f"{slot}.npy"), np.array(allocator.allocations, dtype=ALLOC_TABLE_TYPE))
    except Exception as e:
        if disk_full(e) is None:
            raise
        sys.exit(DISK_FULL_EXIT)  # said by the parent process, in one line


def _supervise(processes: list[Process], in_flight, done, dataset: _Images, beton: Path) -> None:
    """Return once every writer process has exited cleanly; else end (raise ChildProcessError, naming the images
    in hand) when one exits with an error or a signal, or when no image is finished for `STALL_S` seconds."""
    progress = tqdm(total=len(dataset))
    count, since = 0, time.monotonic()
    try:
        while True:
            for slot, process in enumerate(processes):
                if process.exitcode == DISK_FULL_EXIT:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(beton))
                if process.exitcode not in (None, 0):
                    code = process.exitcode
                    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit code {code})"
                    why = " (out of memory? `dmesg` says; fewer --workers need less)" if code < 0 else \
                        " (its traceback, if any, is printed above)"
                    raise ChildProcessError(f"{beton}: not written: writer process {process.pid} {how} while "
                                            f"writing {_in_hand([in_flight[slot]], dataset)}{why}")
            if all(process.exitcode == 0 for process in processes):
                return
            now = sum(done)
            if now != count:
                progress.update(now - count)
                count, since = now, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                raise ChildProcessError(f"{beton}: not written: no image finished in {STALL_S:.0f} s, writing "
                                        f"{_in_hand(in_flight, dataset)} (a hung read? the files readable?)")
            time.sleep(0.1)
    finally:
        progress.close()


def _in_hand(in_flight, dataset: _Images) -> str:
    """The paths of the images writer processes hold, by their `in_flight` slots (-1: none)."""
    paths = [dataset.samples[i][0] for i in in_flight if i >= 0]
    return ", ".join(paths) if paths else "no image (starting or finishing)"
