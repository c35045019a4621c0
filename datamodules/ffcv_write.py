"""Writing FFCV `.beton` files (`resnet prepare ffcv`) from the ImageNet folder layout, and checking that a
.beton still matches its folder (labels in order, classes.json's class names)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from datamodules.folder import DatasetLayoutError, decode, find_classes, scan_split
from datamodules.imagenet import usable_cpus

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV (ffcv.pipeline.compiler) sets torch to one CPU thread
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
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
