"""Which images a run reads, found once: from the manifest of `resnet prepare check` when a valid one exists (no rank
lists the folders), else by one process listing them and sending the list to the other ranks (a shared file system
answers one listing of 1.28 M entries, not one per GPU)."""

from __future__ import annotations

import logging
import os
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
    manifest leaves out per split, and where the lists came from ("manifest <path>" or "folder scan")."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    left_out: dict[str, list[str]] = field(default_factory=dict)
    source: str = "folder scan"


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
                   {s: manifest.bad_paths(s) for s in splits}, f"manifest {manifest.path}")


def load_samples(root: str | Path, splits: Sequence[str], label_split: str = "train",
                 manifest: Optional[str] = None, rank: int = 0) -> Samples:
    """The samples of `splits` (e.g. ("train", "val")) under `root`, labels by the class folders of `label_split`.

    Rank 0 looks for a valid manifest (`manifest`, else the default places: datamodules/manifest.py) and else scans
    the folders; with a process group, the other ranks get its answer (the manifest's path, which they read, or
    the scanned lists) instead of listing anything. A fault found on rank 0 is raised on every rank.

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
            answer = {"manifest": str(found.path)} if found else _scan(root, splits, label_split)
        except Exception as e:  # sent to the other ranks: they raise it too instead of waiting
            answer = e
    if _distributed():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, Exception):
        raise answer
    if "manifest" in answer:
        found = found or read_manifest(Path(answer["manifest"]), root)
        samples = _from_manifest(found, root, splits)
    else:
        samples = Samples(answer["classes"], {
            split: [(str(root / split / wnid / name), label) for wnid, label, names in answer["splits"][split]
                    for name in names]
            for split in splits})
    log.info("%s: %s", root, samples.source)
    return samples


__all__ = ["Samples", "load_samples"]
