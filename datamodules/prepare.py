"""`resnet prepare imagenet`: the official ILSVRC2012 files (or Kaggle's copy of them) arranged into the folder
layout the DataModules read: `dst/train/<wnid>/*.JPEG` and `dst/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`.

A train class folder or a val image gets its final name only once complete (it is written under dst/.prepare_tmp
first, synced to disk, then renamed), so a run stopped half-way, or a machine that crashed, is completed by the next
run, and a run on a complete dst writes nothing. The official files' MD5 and the labels are checked before anything is
written: a damaged download or a bad ground truth costs minutes, not hours of copying. A file verified before (same
path, size and mtime, recorded in dst/.prepare_verified.json) is not hashed again. Hidden and operating-system files of
the sources (macOS `._x.JPEG` and `.DS_Store`, `__MACOSX/`, `Thumbs.db`) are skipped and listed."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator, Optional

import numpy as np

from datamodules.folder import IMAGE_EXTENSIONS, DatasetLayoutError, is_hidden
from datamodules.prepare_io import VerifiedRecord, fsync_path

FULL_TRAIN, FULL_VAL, NUM_CLASSES = 1_281_167, 50_000, 1000
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
META, GROUND_TRUTH = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_DATA, KAGGLE_CSV = "ILSVRC/Data/CLS-LOC", "LOC_val_solution.csv"
WNID = re.compile(r"n\d{8}")
VAL_NAME = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
# The published MD5 of the official files (also torchvision's ImageNet dataset's). Kaggle's copy publishes none.
MD5 = {TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e", VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
       DEVKIT: "fa75699e90414af021442c21a62c3abf"}
# Val images synced together, then renamed: ~65 MB that the kernel writes back at once, not 50,000 waits one by one.
VAL_BATCH = 500

Opener = Callable[[], IO[bytes]]  # a source image, opened only when it is written
ClassImages = Callable[[], Iterator[tuple[str, Opener]]]  # (name, opener) of one class, listed when it is written


@dataclass
class _Sources:
    train_tar: Optional[Path] = None
    val_tar: Optional[Path] = None
    devkit: Optional[Path] = None
    train_dir: Optional[Path] = None  # Kaggle's CLS-LOC/train/<wnid>/
    val_dir: Optional[Path] = None  # Kaggle's flat CLS-LOC/val/
    val_csv: Optional[Path] = None


def prepare_imagenet(
    dst: str,
    src: Optional[str] = None,
    train_tar: Optional[str] = None,
    val_tar: Optional[str] = None,
    devkit: Optional[str] = None,
    verify_checksums: bool = True,
) -> dict[str, int]:
    """Arrange ILSVRC2012 into dst/train/<wnid>/ and dst/val/<wnid>/, completing a partial dst; prints a summary,
    with the hidden and operating-system files of the sources that were skipped.

    Args:
        dst: folder to hold train/ and val/ (e.g. /data/imagenet).
        src: folder holding the official files below under their own names, or Kaggle's ILSVRC/ and
            LOC_val_solution.csv.
        train_tar: ILSVRC2012_img_train.tar (one <wnid>.tar per class); overrides the one in --src.
        val_tar: ILSVRC2012_img_val.tar (flat JPEGs, labelled by --devkit); overrides the one in --src.
        devkit: ILSVRC2012_devkit_t12.tar.gz (meta.mat and the val ground truth); overrides the one in --src.
        verify_checksums: compare the official files' MD5 with the published ones first (the train tar: minutes),
            except for files verified before (same path, size and mtime, in dst/.prepare_verified.json); false
            skips it. Kaggle's copy has none to compare.

    Raises:
        datamodules.prepare_io.ChecksumError: an official file whose MD5 is not the published one (nothing is
            written).
        DatasetLayoutError: sources or labels not as expected (nothing is written), or dst lacks images of a full set.
        FileNotFoundError: a source that does not exist.
    """
    s = _find_sources(src, train_tar, val_tar, devkit)
    root = Path(dst)
    tmp = root / ".prepare_tmp"
    skipped: list[str] = []  # hidden and OS files of the sources, as they are read
    verified = VerifiedRecord(root)
    with contextlib.ExitStack() as stack:
        # The small files first: the labels are checked before the train tar's minutes of hashing.
        for path, official in ((s.devkit, DEVKIT), (s.val_tar, VAL_TAR)):
            if verify_checksums and path:
                verified.verify(path, official, MD5[official])
        classes = _read_synsets(*_devkit_file(s.devkit, META)) if s.devkit else {}
        images = _val_images(s, stack, skipped)
        labels = _val_labels(s, images, classes)
        if verify_checksums and s.train_tar:
            verified.verify(s.train_tar, TRAIN_TAR, MD5[TRAIN_TAR])
        train = _train_classes(s, stack, skipped)
        verified.save()  # every check passed: the first write to dst, kept for the resume of a stopped copy
        shutil.rmtree(tmp, ignore_errors=True)  # what a stopped run left half-written
        try:
            new_train = _write_train(train, root / "train", tmp)
            new_val = _write_val(images, labels, root / "val", tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    counts = _summarize(root, set(classes.values()) | set(labels.values()) | set(train), new_train, new_val)
    absent = sorted(labels.keys() - images.keys())
    if absent:
        print(f"  missing: ground-truth lines for images not in the sources: {_some(absent)}")
    if skipped:  # of the sources read now: a rerun does not open the classes already in dst
        print(f"  skipped: hidden and OS files in the sources: {_some(sorted(skipped), 3)}")
    counts["hidden_skipped"] = len(skipped)
    # Sources holding a full set, dst must hold its exact count: images lost on the way show here.
    for split, full, want in (("train", len(train) == NUM_CLASSES, FULL_TRAIN),
                              ("val", len(images) == FULL_VAL, FULL_VAL)):
        if full and counts[f"{split}_images"] != want:
            raise DatasetLayoutError(
                f"{root / split}: {counts[f'{split}_images']:,} images, the full ILSVRC2012 {split} set has {want:,}"
            )
    return counts


def _find_sources(src: Optional[str], train_tar: Optional[str], val_tar: Optional[str],
                  devkit: Optional[str]) -> _Sources:
    """The inputs: the official files (given ones win over those in `src`), or Kaggle's folders under `src`."""
    s = _Sources(*(Path(p) if p else None for p in (train_tar, val_tar, devkit)))
    if src is not None:
        folder = Path(src)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such folder (--src: a folder holding {TRAIN_TAR}, {VAL_TAR}, {DEVKIT})"
            )
        s.train_tar = s.train_tar or (folder / TRAIN_TAR if (folder / TRAIN_TAR).is_file() else None)
        s.val_tar = s.val_tar or (folder / VAL_TAR if (folder / VAL_TAR).is_file() else None)
        s.devkit = s.devkit or (folder / DEVKIT if (folder / DEVKIT).is_file() else None)
        kaggle = folder / KAGGLE_DATA  # used for what no official file gives
        if not s.train_tar and (kaggle / "train").is_dir():
            s.train_dir = kaggle / "train"
        if not s.val_tar and (kaggle / "val").is_dir():
            s.val_dir, s.val_csv = kaggle / "val", folder / KAGGLE_CSV
        if not any((s.train_tar, s.val_tar, s.train_dir, s.val_dir)):
            raise FileNotFoundError(f"{folder}: holds neither {TRAIN_TAR}, {VAL_TAR} nor Kaggle's {KAGGLE_DATA}/")
    elif not (s.train_tar or s.val_tar):
        raise ValueError("nothing to prepare: give --src DIR, or --train-tar and/or --val-tar with --devkit")
    for path in (s.train_tar, s.val_tar, s.devkit, s.val_csv):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{path}: no such file" + (" (Kaggle's val labels)" if path == s.val_csv else ""))
    if s.val_tar and not s.devkit:
        raise ValueError(f"{s.val_tar}: its labels are in the devkit: give --devkit {DEVKIT}")
    return s


def _open_tar(path: Optional[Path], fileobj: Optional[IO[bytes]] = None, name: str = "") -> tarfile.TarFile:
    try:
        return tarfile.open(path, fileobj=fileobj)
    except tarfile.TarError as e:  # a ValueError names the file; TarError is not one
        raise DatasetLayoutError(f"{name or path}: not a readable tar file ({e})") from e


def _devkit_file(devkit: Path, member: str) -> tuple[bytes, str]:
    """One file of the devkit's .tar.gz and the name to quote in errors."""
    with _open_tar(devkit) as tar:
        for m in tar:
            if m.isfile() and ("/" + m.name).endswith("/" + member):
                return tar.extractfile(m).read(), f"{devkit}:{m.name}"
    raise DatasetLayoutError(f"{devkit}: no ILSVRC2012_devkit_t12/{member} in it")


def _read_synsets(data: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (the 1000 classes) of meta.mat; its id order is not sorted-wnid
    order."""
    try:
        from scipy.io import loadmat  # only this command needs it
    except ImportError as e:
        raise ImportError(f"reading {where} needs scipy (pip install scipy)") from e
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True).get("synsets")
    except Exception as e:  # scipy raises ValueError, TypeError or struct.error on a damaged file
        raise DatasetLayoutError(f"{where}: not a readable MATLAB file ({e})") from e
    fields = {"ILSVRC2012_ID", "WNID", "num_children"}
    if synsets is None or synsets.size == 0 or not fields <= set(synsets.dtype.names or ()):
        raise DatasetLayoutError(
            f"{where}: no synsets (expected a struct array 'synsets' with fields {sorted(fields)})"
        )
    leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0}
    if not leaves or not all(WNID.fullmatch(w) for w in leaves.values()):
        raise DatasetLayoutError(f"{where}: no synsets with num_children 0 and a WNID like n01440764")
    return leaves


def _hidden(path: str) -> bool:
    """A hidden or OS file or folder, or a path inside one (tar members: `__MACOSX/n01440764/._x.JPEG`)."""
    return any(is_hidden(part) for part in PurePosixPath(path).parts)


def _val_images(s: _Sources, stack: contextlib.ExitStack, skipped: list[str]) -> dict[str, Opener]:
    """The val images of the sources by file name, in the order they are stored; hidden files go to `skipped`."""
    if s.val_tar:
        tar = stack.enter_context(_open_tar(s.val_tar))
        members = [m for m in tar.getmembers() if m.isfile()]  # 50,000 headers: seconds, also on a complete dst
        skipped.extend(f"{s.val_tar}:{m.name}" for m in members if _hidden(m.name))
        entries = [(m.name, lambda m=m: tar.extractfile(m)) for m in members if not _hidden(m.name)]
    elif s.val_dir:
        found = list(os.scandir(s.val_dir))
        skipped.extend(e.path + ("/" if e.is_dir() else "") for e in found if is_hidden(e.name))
        files = sorted(e.path for e in found if e.is_file() and not is_hidden(e.name))
        entries = [(path, lambda p=path: open(p, "rb")) for path in files]
    else:
        return {}
    for path, _ in entries:
        if not VAL_NAME.fullmatch(PurePosixPath(path).name):
            raise DatasetLayoutError(
                f"{s.val_tar or s.val_dir}: unexpected {path!r} (expected flat ILSVRC2012_val_XXXXXXXX.JPEG files)"
            )
    return {PurePosixPath(path).name: opener for path, opener in entries}


def _val_labels(s: _Sources, images: dict[str, Opener], classes: dict[int, str]) -> dict[str, str]:
    """File name -> wnid of the val images: every image of the sources must have one."""
    if s.val_tar:
        data, where = _devkit_file(s.devkit, GROUND_TRUTH)
        labels = {}
        for i, line in enumerate(data.decode().splitlines(), 1):
            wnid = classes.get(int(line)) if line.strip().isdigit() else None
            if wnid is None:
                raise DatasetLayoutError(f"{where} line {i}: {line.strip()!r} is not an ILSVRC2012_ID of meta.mat's "
                                         f"{len(classes):,} classes")
            labels[f"ILSVRC2012_val_{i:08d}.JPEG"] = wnid
        unlabelled = sorted(images.keys() - labels.keys())
        if unlabelled:
            raise DatasetLayoutError(f"{where}: ground truth has {len(labels):,} lines, the val tar {s.val_tar} has "
                                     f"{len(images):,} images (no line for {unlabelled[0]})")
        return labels
    if s.val_dir:
        labels = _csv_labels(s.val_csv)
        unlabelled = sorted(images.keys() - labels.keys())
        if unlabelled:
            raise DatasetLayoutError(f"{s.val_csv}: no row for {unlabelled[0].removesuffix('.JPEG')} "
                                     f"({len(labels):,} rows, {s.val_dir} has {len(images):,} images)")
        return labels
    return {}


def _csv_labels(path: Path) -> dict[str, str]:
    """Kaggle's val labels: `ImageId,PredictionString` rows, whose first token is the wnid."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        got = rows[0] if rows else "nothing"
        raise DatasetLayoutError(f"{path}: expected the header ImageId,PredictionString, got {got}")
    labels = {}
    for i, row in enumerate(rows[1:], 2):
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens or not WNID.fullmatch(tokens[0]):
            raise DatasetLayoutError(f"{path} line {i}: expected ImageId,<wnid> <box> ..., got {','.join(row)!r}")
        labels[row[0] + ".JPEG"] = tokens[0]
    return labels


def _train_classes(s: _Sources, stack: contextlib.ExitStack, skipped: list[str]) -> dict[str, ClassImages]:
    """wnid -> the images of that class in the sources (listed only when the class is written); hidden files and
    folders, here and in the classes, go to `skipped`."""
    if s.train_tar:
        outer = stack.enter_context(_open_tar(s.train_tar))
        members = [m for m in outer.getmembers() if m.isfile()]  # 1000 headers: fast, also on a complete dst
        skipped.extend(f"{s.train_tar}:{m.name}" for m in members if _hidden(m.name))
        members = [m for m in members if not _hidden(m.name)]
        for m in members:
            if not re.fullmatch(r"n\d{8}\.tar", PurePosixPath(m.name).name):
                raise DatasetLayoutError(f"{s.train_tar}: unexpected {m.name!r} (expected one <wnid>.tar per class)")
        return {PurePosixPath(m.name).stem: lambda m=m: _tar_images(outer, m, skipped) for m in members}
    if s.train_dir:
        found = sorted(os.scandir(s.train_dir), key=lambda e: e.name)
        skipped.extend(e.path + ("/" if e.is_dir() else "") for e in found if is_hidden(e.name))
        folders = [e for e in found if e.is_dir() and not is_hidden(e.name)]
        for e in folders:
            if not WNID.fullmatch(e.name):
                raise DatasetLayoutError(f"{e.path}: not a class folder (expected <wnid>/ folders like n01440764/)")
        return {e.name: lambda d=e.path: _folder_images(d, skipped) for e in folders}
    return {}


def _tar_images(outer: tarfile.TarFile, member: tarfile.TarInfo, skipped: list[str]) -> Iterator[tuple[str, Opener]]:
    with _open_tar(None, outer.extractfile(member), f"{outer.name}:{member.name}") as inner:
        for m in inner:
            if m.isfile() and _hidden(m.name):
                skipped.append(f"{outer.name}:{member.name}:{m.name}")
            elif m.isfile():
                yield PurePosixPath(m.name).name, lambda m=m: inner.extractfile(m)


def _folder_images(folder: str, skipped: list[str]) -> Iterator[tuple[str, Opener]]:
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(e.name):
            skipped.append(e.path + ("/" if e.is_dir() else ""))
        elif e.is_file():
            yield e.name, lambda p=e.path: open(p, "rb")


def _copy(open_source: Opener, target: Path) -> None:
    with open_source() as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _write_train(train: dict[str, ClassImages], split: Path, tmp: Path) -> int:
    """Each class not yet in `split` copied into a temporary folder, then renamed: a class folder is whole or absent."""
    todo, written = [w for w in train if not (split / w).is_dir()], 0
    for done, wnid in enumerate(todo, 1):
        part = tmp / "train" / wnid
        part.mkdir(parents=True)
        for name, opener in train[wnid]():
            if name.lower().endswith(IMAGE_EXTENSIONS):
                _copy(opener, part / name)
        files = list(part.iterdir())
        if files:  # an empty class folder would stop the loaders: the class is reported missing instead
            # Synced once the whole class is written, not file by file: the kernel writes ~1,300 files back together.
            for f in files:
                fsync_path(f)
            fsync_path(part)  # the class gets its name only with its files' entries on disk
            split.mkdir(parents=True, exist_ok=True)
            part.rename(split / wnid)
            fsync_path(split)
            written += 1
        _progress("train", done, len(todo), "classes")
    return written


def _write_val(images: dict[str, Opener], labels: dict[str, str], split: Path, tmp: Path) -> int:
    """Each val image not yet in its class folder copied under a temporary name, then renamed into place, by batches
    of VAL_BATCH in the order of the sources (the val tar is read from start to end)."""
    todo = [name for name in images if not (split / labels[name] / name).is_file()]
    part = tmp / "val"
    for start in range(0, len(todo), VAL_BATCH):
        batch = todo[start:start + VAL_BATCH]
        part.mkdir(parents=True, exist_ok=True)
        for name in batch:
            _copy(images[name], part / name)
        # Each file synced before it gets its final name. Not part/ itself: its entries are renamed away.
        for name in batch:
            fsync_path(part / name)
        for name in batch:
            (split / labels[name]).mkdir(parents=True, exist_ok=True)
            os.replace(part / name, split / labels[name] / name)
        _progress("val", start + len(batch), len(todo), "images", step=len(batch))
    # The renames, once per class folder rather than per batch: a batch of 500 touches ~400 of the 1000 folders. A
    # rename lost in a crash is redone by the next run. val/ holds the entries of the class folders made now.
    for wnid in sorted({labels[name] for name in todo}):
        fsync_path(split / wnid)
    if todo:
        fsync_path(split)
    return len(todo)


def _progress(split: str, done: int, total: int, what: str, step: int = 1) -> None:
    """A line every 5% of `total`; `step`: how far `done` moved since the last call (a batch of val images)."""
    if done == total or done % max(1, total // 20) < step:
        print(f"{split}: {done:,}/{total:,} {what} written", flush=True)


def _count(split: Path) -> dict[str, int]:
    """Images per class folder of one split of dst."""
    if not split.is_dir():
        return {}
    # What the loaders count (datamodules.folder): hidden files and folders are not images or classes.
    folders = (e for e in os.scandir(split) if e.is_dir() and not is_hidden(e.name))
    return {e.name: sum(f.is_file() and not is_hidden(f.name) and f.name.lower().endswith(IMAGE_EXTENSIONS)
                        for f in os.scandir(e.path)) for e in folders}


def _summarize(root: Path, known: set[str], new_train: int, new_val: int) -> dict[str, int]:
    """Count dst and print it, with the known classes that have no train images."""
    train, val = _count(root / "train"), _count(root / "val")
    counts = {"train_classes": len(train), "train_images": sum(train.values()), "val_classes": len(val),
              "val_images": sum(val.values()), "train_classes_written": new_train, "val_images_written": new_val}
    print(f"{root}:")
    print(f"  train: {len(train):,} classes, {counts['train_images']:,} images ({new_train:,} classes written now)")
    print(f"  val:   {len(val):,} classes, {counts['val_images']:,} images ({new_val:,} images written now)")
    no_train = sorted(known - train.keys())
    if no_train:
        print(f"  missing: classes without train images: {_some(no_train)}")
    return counts


def _some(names: list[str], shown: int = 5) -> str:
    return f"{len(names):,} (" + ", ".join(names[:shown]) + (", ...)" if len(names) > shown else ")")
