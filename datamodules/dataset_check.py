"""`resnet prepare check --root DIR`: one pass over a copy of ImageNet, decoding every image on all allowed CPUs, that
reports what a copy extracted, copied and browsed on many machines holds, by kind and by path, and writes the
manifest of its usable samples (datamodules/manifest.py).

Kinds reported: `empty`, `truncated` and `corrupt` files (left out of the manifest: no backend reads them);
images that are not 8-bit RGB (CMYK, gray, palette, alpha, 16-bit: every backend converts them); content that
differs from the extension (a PNG named .JPEG: read by content); hidden and OS files and folders, other files and
symbolic links whose target is gone (never samples); empty classes; val classes absent from train; byte-identical files in train and val (leakage);
and the counts against ILSVRC2012's."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from datamodules.folder import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    DatasetLayoutError,
    decode_bytes,
    find_classes,
    is_hidden,
)
from datamodules.loaders import usable_cpus
from datamodules.manifest import Manifest, folder_key

ILSVRC2012 = {"train": 1_281_167, "val": 50_000, "classes": 1000}  # the published counts of the CLS-LOC task
LEFT_OUT = ("unreadable", "empty", "truncated", "corrupt")
# (kind, what happens to such files): the report's order.
KINDS = {
    "unreadable": "left out: the file cannot be read (permissions, an I/O error)",
    "empty": "left out: 0-byte file (an interrupted copy)",
    "truncated": "left out: the image data ends early",
    "corrupt": "left out: not decodable as an image",
    "convert": "used, converted to 8-bit RGB",
    "extension": "used, read by content: it differs from the extension",
    "hidden": "ignored: hidden or operating-system file or folder",
    "other": "ignored: not an image file (.JPEG/.jpg/.png) or a folder inside a class",
    "dangling": "ignored: a symbolic link whose target is missing (a moved copy, an unmounted file system)",
    "empty_class": "class folder without images: training and validation refuse it",
    "val_only_class": "val class absent from train: validation refuses it",
    "leak": "byte-identical in train and val: validation accuracy counts a training image",
}
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_EXTENSION_FORMAT = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG"}


def content_format(data: bytes) -> str:
    """The image format by its first bytes: JPEG, PNG, GIF, BMP, TIFF, WEBP, or "unknown"."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "unknown")


def conversion(data: bytes, image_format: str) -> str:
    """What makes an image other than 8-bit RGB: "" or "+"-joined kinds of cmyk, gray, palette, alpha, 16-bit."""
    if image_format == "PNG" and len(data) > 25:  # IHDR: bit depth at byte 24, colour type at 25
        depth, colour = data[24], data[25]
        kinds = ["16-bit"] if depth == 16 else []
        kinds += {0: ["gray"], 3: ["palette"], 4: ["gray", "alpha"], 6: ["alpha"]}.get(colour, [])
        return "+".join(kinds)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
    except Exception:  # decodable by torchvision but not identifiable by Pillow: nothing to say
        return ""
    return {"RGB": "", "YCbCr": "", "CMYK": "cmyk", "L": "gray", "P": "palette", "RGBA": "alpha", "LA": "gray+alpha",
            "I;16": "16-bit+gray", "I": "gray"}.get(mode, mode.lower())


def inspect_image(path: str) -> tuple[int, str, str, str, str, str]:
    """Reads and decodes one file: (bytes, BLAKE2b-128 hex digest, problem kind ("" or empty/truncated/corrupt),
    reason, conversion, content format)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # permissions, a failing disk: reported with the rest, the pass goes on
        return 0, "", "unreadable", e.strerror or str(e), "", ""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    image_format = content_format(data)
    try:
        decode_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
                     path)
    except CorruptImageError as e:
        reason = str(e).split(": ", 1)[-1]
        kind = "empty" if not data else "truncated" if re.search(r"truncat|incomplete|premature", reason, re.I) \
            else "corrupt"
        return len(data), digest, kind, reason, "", image_format
    return len(data), digest, "", "", conversion(data, image_format), image_format


def console() -> Console:
    """Rich console, 100 columns when the output is a log file or pipe (rich's default there, 80, cuts paths)."""
    return Console(width=None if sys.stdout.isatty() else 100)


def _worker_init() -> None:
    torch.set_num_threads(1)  # one image per process at a time: the processes are the parallelism


def _walk(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(classes, images per split as "wnid/name", problems found by listing: kind -> relative paths)."""
    problems: dict[str, list[str]] = defaultdict(list)
    images: dict[str, list[str]] = {}
    split_classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        split_classes[split], images[split] = [], []
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            rel = f"{split}/{entry.name}"
            if is_hidden(entry.name):
                problems["hidden"].append(rel + ("/" if entry.is_dir() else ""))
            elif entry.is_symlink() and not os.path.exists(entry.path):
                problems["dangling"].append(f"{rel} -> {os.readlink(entry.path)}")
            elif not entry.is_dir():
                problems["other"].append(rel)  # a stray file beside the class folders: never a sample
            else:
                split_classes[split].append(entry.name)
                found = 0
                for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    if is_hidden(sub.name):
                        problems["hidden"].append(f"{rel}/{sub.name}" + ("/" if sub.is_dir() else ""))
                    elif sub.is_symlink() and not os.path.exists(sub.path):
                        problems["dangling"].append(f"{rel}/{sub.name} -> {os.readlink(sub.path)}")
                    elif sub.is_file() and sub.name.lower().endswith(IMAGE_EXTENSIONS):
                        images[split].append(f"{entry.name}/{sub.name}")
                        found += 1
                    else:
                        problems["other"].append(f"{rel}/{sub.name}")
                if not found:
                    problems["empty_class"].append(rel + "/")
        if not split_classes[split]:
            find_classes(split_dir)  # no class folder: its error (a flat val/ points to `resnet prepare imagenet`)
    if not split_classes:
        if not root.is_dir():
            raise DatasetLayoutError(f"{root}: no such folder (--root: the folder holding train/ and val/)")
        raise DatasetLayoutError(f"{root}: neither train/ nor val/ in it (expected <root>/train/<wnid>/*.JPEG and "
                                 "<root>/val/<wnid>/*.JPEG; see README, 'Training on ImageNet')")
    classes = split_classes.get("train", split_classes.get("val"))
    if "train" in split_classes:
        problems["val_only_class"] += [f"val/{c}/" for c in split_classes.get("val", []) if c not in set(classes)]
    return classes, images, problems


def check_dataset(root: str, manifest: Optional[str] = None, workers: Optional[int] = None,
                  shown: int = 20) -> dict:
    """Decode every image of `root`/train and `root`/val, report problems by kind and path, write the manifest.

    Args:
        root: the data root (`data.root`), holding train/<wnid>/ and val/<wnid>/.
        manifest: where to write the manifest; None = `<root>/.resnet-manifest.json.gz`, or the cache folder
            when the root is read-only (datamodules/manifest.py); training finds it in either place.
        workers: decoding processes; None = the CPUs this process may use.
        shown: paths printed per kind (the full list goes to the report file beside the manifest).

    Returns:
        {"manifest": path, "report": path, "images": {split: usable}, "problems": {kind: [relative paths]},
        "counts": {split: images found}}.

    Raises:
        DatasetLayoutError: no train/ or val/, or a flat val/ (see `resnet prepare imagenet`).
    """
    from rich.progress import track

    root_path = Path(root)
    key = folder_key(root_path)  # before the pass: a folder changed during it makes the manifest stale
    classes, images, problems = _walk(root_path)
    label = {c: i for i, c in enumerate(classes)}
    paths = [(split, rel) for split in images for rel in images[split] if rel.split("/")[0] in label]
    files: dict[str, list[list]] = {split: [] for split in images}
    bad: dict[str, list[list]] = {split: [] for split in images}
    train_digests: dict[str, str] = {}  # digest -> the first train image with it
    val_digests: list[tuple[str, str]] = []  # (digest, path) of every val image: each leaked copy is a line
    with ProcessPoolExecutor(max_workers=workers or usable_cpus(), initializer=_worker_init) as pool:
        # A crashed process breaks the pool (BrokenProcessPool): never a wait without end.
        results = pool.map(inspect_image, [str(root_path / split / rel) for split, rel in paths], chunksize=64)
        for (split, rel), (size, digest, kind, reason, convert, image_format) in track(
                zip(paths, results), total=len(paths), description=f"checking {len(paths)} images",
                console=console(), transient=True):
            where = f"{split}/{rel}"
            if kind:
                bad[split].append([rel, kind, reason])
                problems[kind].append(f"{where}: {reason}")
                continue
            files[split].append([rel, label[rel.split("/")[0]], size, convert, image_format])
            if split == "train":
                train_digests.setdefault(digest, where)
            else:
                val_digests.append((digest, where))
            if convert:
                problems["convert"].append(f"{where}: {convert}")
            expected = _EXTENSION_FORMAT[os.path.splitext(rel)[1].lower()]
            if image_format != expected:
                problems["extension"].append(f"{where}: {image_format} content")
    problems["leak"] += sorted(f"{where} = {train_digests[d]}" for d, where in val_digests if d in train_digests)
    refused = {kind: problems[kind] for kind in ("empty_class", "val_only_class") if problems.get(kind)}
    written = Manifest(root_path, key, classes, files, bad, refused).write(Path(manifest) if manifest else None)
    counts = {split: len(images[split]) for split in images}
    report = _report(root_path, written, classes, counts, files, problems, shown)
    return {"manifest": str(written), "report": str(report), "images": {s: len(f) for s, f in files.items()},
            "problems": dict(problems), "counts": counts}


def _report(root: Path, manifest: Path, classes: list[str], counts: dict, files: dict, problems: dict,
            shown: int) -> Path:
    """Prints the summary and the first `shown` paths of each kind; writes every path to `<manifest>.report.txt`."""
    from rich.table import Table

    lines = [f"resnet prepare check: {root}"]
    table = Table(title=f"{root}: {len(classes)} classes (ILSVRC2012: {ILSVRC2012['classes']})")
    for column in ("split", "images found", "usable", "ILSVRC2012"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, found in counts.items():
        table.add_row(split, f"{found:,}", f"{len(files[split]):,}", f"{ILSVRC2012[split]:,}")
        lines.append(f"{split}: {found} images found, {len(files[split])} usable (ILSVRC2012: {ILSVRC2012[split]})")
    console().print(table)
    for kind, what in KINDS.items():
        paths = problems.get(kind, [])
        if not paths:
            continue
        console().print(f"[bold]{kind}[/bold] ({len(paths):,}): {what}", highlight=False)
        for path in paths[:shown]:
            console().print(f"  {path}", highlight=False, markup=False)
        if len(paths) > shown:
            console().print(f"  ... and {len(paths) - shown:,} more", highlight=False)
        lines += [f"{kind} ({len(paths)}): {what}"] + [f"  {p}" for p in paths]
    report = manifest.with_name(manifest.name.removesuffix(".json.gz") + ".report.txt")
    report.write_text("\n".join(lines) + "\n")
    console().print(f"manifest: {manifest}\nfull report: {report}", highlight=False)
    return report


__all__ = ["ILSVRC2012", "KINDS", "check_dataset", "content_format", "conversion", "inspect_image"]
