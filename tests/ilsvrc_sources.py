"""Fake ILSVRC2012 sources for the `resnet prepare imagenet` tests: real tar files (a tar of per-class tars, a flat val
tar, a devkit .tar.gz with a meta.mat written by scipy) and Kaggle's folder layout with its CSV of val labels, and the
tree `prepare imagenet` must make of them, written out by hand."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.prepare import DEVKIT, TRAIN_TAR, VAL_TAR

# meta.mat's (ILSVRC2012_ID, WNID, num_children): ids 1-3 are deliberately not in sorted-wnid order, id 4 is a leaf
# without train images, id 5 an inner node that is no class.
SYNSETS = [(1, "n02000001", 0), (2, "n03000002", 0), (3, "n01000003", 0), (4, "n04000004", 0), (5, "n00001740", 4)]
WNID_OF = {1: "n02000001", 2: "n03000002", 3: "n01000003", 4: "n04000004"}
TRAIN = {"n01000003": 3, "n02000001": 2, "n03000002": 4}  # images per class
GROUND_TRUTH = [2, 3, 1, 1, 2, 3, 4, 1]  # lines 7 and 8 label images that the val sources lack
N_VAL = 6
PUBLISHED_MD5 = {TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e", VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
                 DEVKIT: "fa75699e90414af021442c21a62c3abf"}
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"  # the start of a macOS `._x` resource companion
SUMMARY = [
    "  train: 3 classes, 9 images (3 classes written now)",
    "  val:   3 classes, 6 images (6 images written now)",
    "  missing: classes without train images: 1 (n04000004)",
    "  missing: ground-truth lines for images not in the sources: 2 (ILSVRC2012_val_00000007.JPEG, ILSVRC2012_val_00000008.JPEG)",
]


def jpeg(seed: int) -> bytes:
    """A tiny real JPEG whose bytes differ with the seed."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def train_files() -> dict[str, bytes]:
    return {f"{w}_{k}.JPEG": jpeg(int(w[1:]) * 10 + k) for w, n in TRAIN.items() for k in range(1, n + 1)}


def val_files() -> dict[str, bytes]:
    return {f"ILSVRC2012_val_{i:08d}.JPEG": jpeg(i) for i in range(1, N_VAL + 1)}


def expected_tree() -> dict[str, bytes]:
    """What dst must hold, written out by hand: val image i goes to meta.mat's wnid of its ground-truth id."""
    tree = {f"train/{name.split('_')[0]}/{name}": data for name, data in train_files().items()}
    tree.update({f"val/{WNID_OF[GROUND_TRUTH[i - 1]]}/ILSVRC2012_val_{i:08d}.JPEG": jpeg(i) for i in range(1, N_VAL + 1)})
    return tree


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path, files_only: bool = False) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() or not files_only}


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_devkit(path: Path, meta: dict | None = None, ground_truth: str | None = None) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz with data/meta.mat (SYNSETS by default) and the val ground truth."""
    savemat = pytest.importorskip("scipy.io", reason="writing meta.mat needs scipy, which pyproject lacks").savemat
    if meta is None:
        fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
        synsets = np.empty((len(SYNSETS), 1), dtype=[(f, object) for f in fields])
        for row, (i, wnid, children) in enumerate(SYNSETS):
            synsets[row, 0] = (i, wnid, f"words {i}", "gloss", children, np.arange(1, children + 1), 0, 0)
        meta = {"synsets": synsets}
    mat = io.BytesIO()
    savemat(mat, meta)
    ground_truth = "".join(f"{k}\n" for k in GROUND_TRUTH) if ground_truth is None else ground_truth
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        if ground_truth:
            add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth.encode())
    return path


def write_official(folder: Path, hidden: bool = False) -> Path:
    """The three official files under their own names: a tar of per-class tars, a flat val tar, the devkit; `hidden`
    adds what a copy through macOS leaves in tars (`._x` companions, `.DS_Store`, `__MACOSX/`)."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / TRAIN_TAR, "w") as outer:
        for wnid in TRAIN:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for name, data in train_files().items():
                    if name.startswith(wnid):
                        add(tar, name, data)
                if hidden and wnid == "n01000003":
                    add(tar, "._n01000003_1.JPEG", APPLE_DOUBLE)
            add(outer, f"{wnid}.tar", inner.getvalue())
        if hidden:
            add(outer, "._n01000003.tar", APPLE_DOUBLE)
    with tarfile.open(folder / VAL_TAR, "w") as tar:
        for name, data in val_files().items():
            add(tar, name, data)
        if hidden:
            add(tar, ".DS_Store", b"\x00\x00\x00\x01Bud1")
            add(tar, "__MACOSX/._ILSVRC2012_val_00000001.JPEG", APPLE_DOUBLE)
    write_devkit(folder / DEVKIT)
    return folder


def write_kaggle(folder: Path) -> Path:
    """Kaggle's layout: CLS-LOC/train/<wnid>/, flat CLS-LOC/val/, a test/ to ignore, LOC_val_solution.csv."""
    data = folder / "ILSVRC/Data/CLS-LOC"
    for name, image in train_files().items():
        (data / "train" / name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        (data / "train" / name.split("_")[0] / name).write_bytes(image)
    (data / "val").mkdir()
    for name, image in val_files().items():
        (data / "val" / name).write_bytes(image)
    (data / "test").mkdir()
    (data / "test/ILSVRC2012_test_00000001.JPEG").write_bytes(jpeg(99))
    rows = [f"ILSVRC2012_val_{i:08d},{WNID_OF[GROUND_TRUTH[i - 1]]} 1 2 30 40 {WNID_OF[GROUND_TRUTH[i - 1]]} 3 4 5 6\n"
            for i in (7, 3, 1, 8, 5, 2, 4, 6)]  # in no particular order, as Kaggle's
    (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    return folder
