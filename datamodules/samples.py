"""Which images a run reads, found once: from the manifest of `resnet prepare check` when a valid one exists (no rank
lists the folders), else by one process listing them and sending the list to the other ranks (a shared file system
answers one listing of 1.28 M entries, not one per GPU)."""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from datamodules.folder import DatasetLayoutError, find_classes, scan_split
from datamodules.manifest import Manifest, find_manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """The classes (sorted wnids: label = index), each split's (path, label) samples sorted, the unreadable files a
    manifest leaves out per split, where the lists came from ("manifest <path>" or "folder scan"), and the content
    format of the samples that are neither JPEG nor PNG (known from a manifest only)."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    left_out: dict[str, list[str]] = field(default_factory=dict)
    source: str = "folder scan"
    formats: dict[str, str] = field(default_factory=dict)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _scan(root: Path, splits: Sequence[str], label_split: str) -> dict:
    """The folder scan, compact for sending: {"classes", "splits": {split: [(wnid, label, [names])]}}."""
    classes = find_classes(root / label_split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    found = {}
    for split in splits:
        by_class: dict[str, tuple[int, list[str]]] = {}
        for path, label in scan_split(root / split, class_to_idx):
            by_class.setdefault(os.path.basename(os.path.dirname(path)), (label, []))[1].append(os.path.basename(path))
        found[split] = [(wnid, label, names) for wnid, (label, names) in by_class.items()]
    return {"classes": classes, "splits": found}


def _from_manifest(manifest: Manifest, root: Path, splits: Sequence[str]) -> Samples:
    for kind, entries in manifest.refused.items():  # what the folder scan refuses, refused alike
        for entry in entries:
            split, wnid = entry.strip("/").split("/")[:2]
            if split in splits:
                why = ("empty class folder" if kind == "empty_class"
                       else f"class {wnid!r} is not among the {len(manifest.classes)} train classes")
                raise DatasetLayoutError(f"{root / split / wnid}: {why} (found by `resnet prepare check`: "
                                         f"{manifest.path})")
    return Samples(manifest.classes, {s: manifest.samples(s) for s in splits},
                   {s: manifest.bad_paths(s) for s in splits}, f"manifest {manifest.path}",
                   {path: fmt for s in splits for path, fmt in manifest.formats(s).items()})


def load_samples(root: str | Path, splits: Sequence[str], label_split: str = "train",
                 manifest: Optional[str] = None, rank: int = 0) -> Samples:
    """The samples of `splits` (e.g. ("train", "val")) under `root`, labels by the class folders of `label_split`.

    Rank 0 looks for a valid manifest (`manifest`, else the default places: datamodules/manifest.py) and else scans
    the folders; with a process group, the other ranks get its answer (the manifest's bytes, or the scanned lists)
    instead of opening or listing anything: the cache folder a manifest may live in need not be shared by the
    nodes. A fault on rank 0, or a job signal during its scan, is raised on every rank.

    Raises:
        DatasetLayoutError: the layout faults of `find_classes`/`scan_split`, also when a manifest holds them; an
            explicit `manifest` that is missing, stale or of another root.
    """
    root = Path(root)
    found: Optional[Manifest] = None
    answer: object = None
    if rank == 0 or not _distributed():
        try:
            found = find_manifest(root, manifest)
            answer = {"manifest": str(found.path), "data": found.raw} if found else _scan(root, splits, label_split)
        except BaseException as e:  # sent to the other ranks (a job signal's Preempted too): they raise it as well
            answer = e
    if _distributed():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, BaseException):
        raise answer
    if "manifest" in answer:
        found = found or read_manifest(Path(answer["manifest"]), root, answer["data"])
        samples = _from_manifest(found, root, splits)
    else:
        samples = Samples(answer["classes"], {
            split: [(str(root / split / wnid / name), label) for wnid, label, names in answer["splits"][split]
                    for name in names]
            for split in splits})
    log.info("%s: %s", root, samples.source)
    return samples


DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # what DALI's image decoders read (GIF is not among them)


def without_formats_dali_lacks(found: Samples) -> Samples:
    """The samples DALI can decode (the formats a manifest knows): other training images are left out with a
    warning; another format in validation is an error naming the files (each counts in the accuracy)."""
    lacking = {path: fmt for path, fmt in found.formats.items() if fmt not in DALI_FORMATS}
    if not lacking:
        return found
    val = [f"{path} ({lacking[path]})" for path, _ in found.splits.get("val", []) if path in lacking]
    if val:
        raise DatasetLayoutError(
            f"data.backend=dali cannot decode {len(val)} validation images: {', '.join(val[:10])}; convert them to "
            f"JPEG or PNG, or use data.backend torchvision"
        )
    splits = {split: [s for s in samples if s[0] not in lacking] for split, samples in found.splits.items()}
    log.warning("data.backend=dali: %d training images in formats DALI cannot decode left out: %s", len(lacking),
                ", ".join(f"{path} ({fmt})" for path, fmt in list(lacking.items())[:5]))
    return Samples(found.classes, splits, found.left_out, found.source, {})


def sample_fingerprint(samples: list[tuple[str, int]], split_dir: Path) -> dict:
    """{count, crc32} of a split's sample list (paths relative to `split_dir`, labels): the epoch order is drawn
    over it, so a resume over another list would repeat and miss images of the epoch in progress."""
    cut = len(str(split_dir)) + 1  # samples are <split_dir>/<wnid>/<file>: a slice, not relpath (1.28 M of them)
    text = "\n".join(f"{path[cut:]}\t{label}" for path, label in samples)
    return {"count": len(samples), "crc32": zlib.crc32(text.encode())}


def gather_objects(obj, rank: int) -> dict[int, object]:
    """{rank: obj} of every rank (a collective: all ranks call it), or {rank: obj} without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {rank: obj}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return dict(enumerate(gathered))


__all__ = ["DALI_FORMATS", "Samples", "gather_objects", "load_samples", "sample_fingerprint", "without_formats_dali_lacks"]
