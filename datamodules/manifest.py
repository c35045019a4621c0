"""The manifest of a checked ImageNet copy (`resnet prepare check` writes it): the usable samples of each split with
their labels, byte sizes and what needs converting, and the files left out as unreadable. With one, no rank lists
the folders at start-up (1.28 M directory entries on a shared file system), and DALI, which cannot skip a file at run
time, never meets a bad one.

A manifest is keyed by the modification times of the split folders and of every class folder: adding, removing or
renaming a file changes its folder's time, and the manifest is then stale (used no more, with a warning). An image
rewritten in place under the same name keeps the key: check again after repairing files."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datamodules.folder import DatasetLayoutError, is_hidden

log = logging.getLogger(__name__)

FORMAT, VERSION = "resnet-imagenet-manifest", 2
NAME = ".resnet-manifest.json.gz"  # in the data root (a hidden file: never a sample) when the root is writable


def cache_dir() -> Path:
    """Where manifests of read-only data roots go: $RESNET_CACHE, else $XDG_CACHE_HOME/resnet-imagenet, else
    ~/.cache/resnet-imagenet (a home folder shared by the cluster's nodes serves every rank)."""
    if os.environ.get("RESNET_CACHE"):
        return Path(os.environ["RESNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet-imagenet"


def default_paths(root: Path) -> list[Path]:
    """Where a manifest of `root` is looked for, in order: in the root, then in the cache (named by the root's
    real path)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return [Path(root) / NAME, cache_dir() / f"manifest-{digest}.json.gz"]


def folder_key(root: Path) -> dict:
    """The modification and change times (ns) of each split folder and of its (non-hidden) class folders: what
    changes when a file is added, removed or renamed (the change time also when a tree is re-extracted or copied
    with its old modification times: tar, cp -a, rsync -t cannot set it). One listing of each split folder and a
    stat per class."""
    key = {}
    for split in ("train", "val"):
        split_dir = Path(root) / split
        if split_dir.is_dir():
            classes = {e.name: _times(e.stat()) for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name)}
            key[split] = {"times": _times(split_dir.stat()), "classes": classes}
    return key


def _times(stat: os.stat_result) -> list[int]:
    return [stat.st_mtime_ns, stat.st_ctime_ns]


@dataclass
class Manifest:
    """A checked copy: `classes` (sorted wnids: label = index); per split, `files` as [relative path, label, bytes,
    conversion ("" for 8-bit RGB, else e.g. "cmyk", "gray", "palette", "alpha", "16-bit"), content format (JPEG,
    PNG, GIF, BMP, TIFF, WEBP or unknown: what DALI may not decode)] and `bad` as
    [relative path, kind, reason] for the files left out (empty, truncated, corrupt); `refused`: the layout faults
    a folder scan refuses too ({"empty_class": ["train/<wnid>/", ...], "val_only_class": ["val/<wnid>/", ...]})."""

    root: Path
    key: dict
    classes: list[str]
    files: dict[str, list[list]] = field(default_factory=dict)
    bad: dict[str, list[list]] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)
    path: Optional[Path] = None  # where it was read from or written to
    raw: bytes = field(default=b"", repr=False)  # the file's bytes as read: what rank 0 sends the other ranks

    def samples(self, split: str) -> list[tuple[str, int]]:
        """(path, label) of the usable images of `split`, sorted as the folder scan sorts them."""
        base = str(self.root / split)
        return [(os.path.join(base, rel), label) for rel, label, *_ in self.files.get(split, [])]

    def formats(self, split: str) -> dict[str, str]:
        """{path: content format} of the usable images of `split` that are neither JPEG nor PNG."""
        base = self.root / split
        return {str(base / row[0]): row[4] for row in self.files.get(split, [])
                if len(row) > 4 and row[4] not in ("JPEG", "PNG")}

    def bad_paths(self, split: str) -> list[str]:
        return [str(self.root / split / rel) for rel, *_ in self.bad.get(split, [])]

    def write(self, path: Optional[Path] = None) -> Path:
        """Atomically (a temporary file renamed) into `path`, or the first default place that can be written.

        Raises:
            OSError: no default place (nor `path`) can be written, naming them.
        """
        data = gzip.compress(json.dumps({
            "format": FORMAT, "version": VERSION, "root": str(self.root.resolve()), "key": self.key,
            "classes": self.classes, "files": self.files, "bad": self.bad, "refused": self.refused,
        }, separators=(",", ":")).encode(), compresslevel=5)
        errors = []
        for target in [Path(path)] if path else default_paths(self.root):
            partial = None
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
                with os.fdopen(handle, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(partial, target)
                self.path = target
                return target
            except OSError as e:  # a read-only data root: the cache next
                errors.append(f"{target}: {e.strerror or e}")
                if partial is not None:
                    Path(partial).unlink(missing_ok=True)
        raise OSError("cannot write the manifest: " + "; ".join(errors) + " (set RESNET_CACHE to a writable folder)")


def read_manifest(path: Path, root: Path, data: Optional[bytes] = None) -> Manifest:
    """The manifest at `path` (or its bytes `data`, as rank 0 read and checked them there) for data root `root`.

    Raises:
        DatasetLayoutError: not a manifest of this project, or of another root.
    """
    sent = data is not None  # by rank 0, which checked the root: paths resolve differently on other nodes at times
    try:
        data = Path(path).read_bytes() if data is None else data
        state = json.loads(gzip.decompress(data))
    except (OSError, ValueError, EOFError) as e:
        raise DatasetLayoutError(f"{path}: not a readable manifest ({e}); rerun `resnet prepare check --root "
                                 f"{root}`") from e
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise DatasetLayoutError(f"{path}: not a manifest of version {VERSION} (rerun `resnet prepare check`)")
    if not sent and Path(state["root"]) != Path(root).resolve():
        raise DatasetLayoutError(f"{path}: a manifest of {state['root']}, not of {Path(root).resolve()}")
    return Manifest(Path(root), state["key"], state["classes"], state["files"], state["bad"], state["refused"],
                    Path(path), data)


def find_manifest(root: Path, path: Optional[str] = None) -> Optional[Manifest]:
    """The valid manifest of `root`: the one at `path` if given, else the first found at `default_paths(root)`.
    A stale one (the folders changed since it was written) is not used.

    Raises:
        DatasetLayoutError: `path` is missing, unreadable or stale (an explicit manifest must be valid).
    """
    candidates = [Path(path)] if path else [p for p in default_paths(root) if p.is_file()]
    if path and not Path(path).is_file():
        raise DatasetLayoutError(f"data.manifest={path}: no such file (write it with `resnet prepare check --root "
                                 f"{root} --manifest {path}`)")
    for candidate in candidates:
        try:
            manifest = read_manifest(candidate, root)
        except DatasetLayoutError as e:
            if path:
                raise
            log.warning("%s; listing the folders instead", e)  # e.g. a data root copied with its manifest
            continue
        if manifest.key == folder_key(root):
            return manifest
        message = (f"{candidate}: stale, {root} changed since `resnet prepare check` wrote it (files added, removed "
                   f"or renamed); rerun it")
        if path:
            raise DatasetLayoutError(message)
        log.warning("%s; listing the folders instead", message)
    return None


__all__ = ["Manifest", "NAME", "cache_dir", "default_paths", "find_manifest", "folder_key", "read_manifest"]
