"""`resnet prepare imagenet` on small fake ILSVRC2012 sources: real tar files (a tar of per-class tars, a flat val
tar, a devkit .tar.gz with a meta.mat written by scipy) and Kaggle's folder layout with its CSV of val labels. The fake
tars have MD5s of their own: tests pass verify_checksums=False, or stand the fakes' MD5 in for the published ones."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest

from datamodules import prepare
from datamodules.folder import DatasetLayoutError, find_classes, scan_split
from datamodules.prepare import DEVKIT, TRAIN_TAR, VAL_TAR, prepare_imagenet
from datamodules.prepare_io import ChecksumError
from tests.conftest import run_resnet
from tests.ilsvrc_sources import (APPLE_DOUBLE, N_VAL, PUBLISHED_MD5, SUMMARY, add, expected_tree, jpeg, mtimes, tree,
                                   write_devkit, write_kaggle, write_official)


@pytest.fixture
def official(tmp_path) -> Path:
    return write_official(tmp_path / "ilsvrc")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_official_tars_through_the_cli(official, tmp_path):
    dst = tmp_path / "imagenet"
    args = ["prepare", "imagenet", "--train-tar", str(official / TRAIN_TAR), "--val_tar", str(official / VAL_TAR),
            "--devkit", str(official / DEVKIT), "--dst", str(dst)]
    proc = run_resnet(*args, expect_rc=2)  # the fake devkit is not the published file
    assert proc.stderr.splitlines()[-1] == (
        f"resnet prepare: error: {official / DEVKIT}: MD5 {md5(official / DEVKIT)}, the published {DEVKIT} has "
        f"{PUBLISHED_MD5[DEVKIT]}: the file is damaged or incomplete. Download it again, or pass --verify_checksums "
        "false to use it as it is"
    )
    assert not dst.exists()
    proc = run_resnet(*args, "--verify-checksums", "false")
    assert tree(dst) == expected_tree()
    assert sorted(p.name for p in dst.iterdir()) == ["train", "val"]  # no temporary folder left
    # The first val image has ground-truth id 2: meta.mat's n03000002, where sorted wnids would give n02000001.
    assert (dst / "val/n03000002/ILSVRC2012_val_00000001.JPEG").read_bytes() == jpeg(1)
    assert proc.stdout.splitlines()[-5:] == [f"{dst}:", *SUMMARY]
    # The loaders read it: val classes are among the train classes, in sorted order.
    classes = find_classes(dst / "train")
    assert classes == ["n01000003", "n02000001", "n03000002"]
    assert len(scan_split(dst / "val", {w: i for i, w in enumerate(classes)})) == N_VAL


def test_kaggle_layout_through_the_cli(tmp_path):
    dst = tmp_path / "imagenet"
    proc = run_resnet("prepare", "imagenet", "--src", str(write_kaggle(tmp_path / "kaggle")), "--dst", str(dst))
    assert tree(dst) == expected_tree()
    assert proc.stdout.splitlines()[-5:] == [f"{dst}:", *SUMMARY]


@pytest.mark.parametrize("source", ["official", "kaggle"])
def test_rerun_writes_nothing_and_a_partial_dst_is_completed(source, tmp_path):
    src = write_official(tmp_path / "src") if source == "official" else write_kaggle(tmp_path / "src")
    dst = tmp_path / "imagenet"
    assert prepare_imagenet(str(dst), src=str(src), verify_checksums=False)["val_images_written"] == N_VAL
    before = mtimes(dst)
    again = prepare_imagenet(str(dst), src=str(src), verify_checksums=False)
    assert (again["train_classes_written"], again["val_images_written"], again["train_images"]) == (0, 0, 9)
    assert mtimes(dst) == before
    # A run stopped half-way: one class not renamed yet, one val image missing, temporary files left over.
    shutil.rmtree(dst / "train/n03000002")
    (dst / "val/n02000001/ILSVRC2012_val_00000003.JPEG").unlink()
    (dst / ".prepare_tmp/train/n03000002").mkdir(parents=True)
    (dst / ".prepare_tmp/train/n03000002/n03000002_1.JPEG").write_bytes(b"half")
    kept = {k: v for k, v in mtimes(dst, files_only=True).items() if not k.startswith(".prepare_tmp/")}
    counts = prepare_imagenet(str(dst), src=str(src), verify_checksums=False)
    assert (counts["train_classes_written"], counts["val_images_written"]) == (1, 1)
    assert tree(dst) == expected_tree()
    assert {k: v for k, v in mtimes(dst, files_only=True).items() if k in kept} == kept  # the rest untouched


# Copies 1-3 are class n01000003, 4-5 n02000001, 6-9 n03000002, then the val images by batches of 2: 10-11, 12-13.
@pytest.mark.parametrize("stop_after, kept, folders",
                         [(5, 3, ["train"]), (11, 9, ["train"]), (13, 11, ["train", "val"])],
                         ids=["in-2nd-train-class", "in-1st-val-batch", "in-2nd-val-batch"])
def test_a_stopped_run_leaves_no_partial_file_or_class(tmp_path, monkeypatch, stop_after, kept, folders):
    src, dst = write_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    monkeypatch.setattr(prepare, "VAL_BATCH", 2)
    copy, calls = prepare._copy, []

    def copy_then_stop(open_source, target):  # Ctrl-C with an image half-written
        calls.append(target)
        if len(calls) == stop_after:
            target.write_bytes(open_source().read()[:100])
            raise KeyboardInterrupt
        copy(open_source, target)

    monkeypatch.setattr(prepare, "_copy", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_imagenet(str(dst), src=str(src))
    written, expected = tree(dst), expected_tree()
    assert written.items() <= expected.items() and len(written) == kept  # whole files of whole classes only
    assert sorted(p.name for p in dst.iterdir()) == folders  # and no temporary folder
    monkeypatch.setattr(prepare, "_copy", copy)
    prepare_imagenet(str(dst), src=str(src))
    assert tree(dst) == expected


@pytest.mark.parametrize(
    "devkit, message",
    [
        ({"ground_truth": "2\n3\n1\n1\n2\n"}, r"ground_truth.txt: ground truth has 5 lines, the val tar \S+ has 6 images "
                                              r"\(no line for ILSVRC2012_val_00000006.JPEG\)"),
        ({"ground_truth": "2\n9\n1\n1\n2\n3\n"}, r"ground_truth.txt line 2: '9' is not an ILSVRC2012_ID of meta.mat's 4 classes"),
        ({"meta": {"other": np.zeros(3)}}, r"data/meta.mat: no synsets \(expected a struct array 'synsets'"),
        ({"ground_truth": ""}, r"ILSVRC2012_devkit_t12.tar.gz: no ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground"),
    ],
    ids=["too-few-lines", "not-a-class", "no-synsets", "no-ground-truth"],
)
def test_bad_ground_truth_is_an_error_and_dst_is_kept(official, tmp_path, devkit, message):
    dst = tmp_path / "imagenet"
    prepare_imagenet(str(dst), src=str(official), verify_checksums=False)
    before, before_times = tree(dst), mtimes(dst)
    bad = write_devkit(tmp_path / DEVKIT, **devkit)
    with pytest.raises(DatasetLayoutError, match=message):
        prepare_imagenet(str(dst), train_tar=str(official / TRAIN_TAR), val_tar=str(official / VAL_TAR),
                         devkit=str(bad), verify_checksums=False)
    assert tree(dst) == before and mtimes(dst) == before_times


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda csv: csv.write_text("".join(l for l in csv.read_text().splitlines(True) if "_00000005," not in l)),
         r"LOC_val_solution.csv: no row for ILSVRC2012_val_00000005 \(7 rows, \S+/CLS-LOC/val has 6 images\)$"),
        (lambda csv: csv.write_text("id,label\n"), r"LOC_val_solution.csv: expected the header ImageId,PredictionString"),
        (lambda csv: csv.write_text(csv.read_text().replace("n01000003 1", "cat 1", 1)),
         r"LOC_val_solution.csv line \d: expected ImageId,<wnid> <box> ..., got 'ILSVRC2012_val_0000000\d,cat 1"),
        (lambda csv: csv.unlink(), r"LOC_val_solution.csv: no such file \(Kaggle's val labels\)"),
    ],
    ids=["missing-row", "header", "not-a-wnid", "no-csv"],
)
def test_bad_kaggle_csv_is_an_error_before_any_copying(tmp_path, damage, message):
    src, dst = write_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    damage(src / "LOC_val_solution.csv")
    with pytest.raises((DatasetLayoutError, FileNotFoundError), match=message):
        prepare_imagenet(str(dst), src=str(src))
    assert not dst.exists()


def test_full_set_counts_are_verified(tmp_path, monkeypatch):
    """With sources of the full class count, dst must hold the full image count: a lost image is found."""
    src, dst = write_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    monkeypatch.setattr(prepare, "NUM_CLASSES", 3)  # this small set stands for the full one: 9 train, 6 val
    monkeypatch.setattr(prepare, "FULL_TRAIN", 9)
    monkeypatch.setattr(prepare, "FULL_VAL", 6)
    assert prepare_imagenet(str(dst), src=str(src))["train_images"] == 9
    (dst / "train/n02000001/n02000001_2.JPEG").unlink()  # its class folder stays, so it is not copied again
    with pytest.raises(DatasetLayoutError, match=rf"{dst}/train: 8 images, the full ILSVRC2012 train set has 9$"):
        prepare_imagenet(str(dst), src=str(src))


def test_bad_sources_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to prepare: give --src DIR"):
        prepare_imagenet(str(tmp_path / "dst"))
    with pytest.raises(FileNotFoundError, match=r"empty: holds neither ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar"):
        prepare_imagenet(str(tmp_path / "dst"), src=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.tar: no such file"):
        prepare_imagenet(str(tmp_path / "dst"), train_tar=str(tmp_path / "nowhere.tar"))
    (tmp_path / "val.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"val.tar: its labels are in the devkit: give --devkit ILSVRC2012_devkit_t12.tar.gz"):
        prepare_imagenet(str(tmp_path / "dst"), val_tar=str(tmp_path / "val.tar"))
    (tmp_path / "train.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DatasetLayoutError, match=r"train.tar: not a readable tar file"):
        prepare_imagenet(str(tmp_path / "dst"), train_tar=str(tmp_path / "train.tar"), verify_checksums=False)
    with tarfile.open(tmp_path / "flat.tar", "w") as tar:
        add(tar, "n01440764_1.JPEG", jpeg(0))
    with pytest.raises(DatasetLayoutError, match=r"flat.tar: unexpected 'n01440764_1.JPEG' \(expected one <wnid>.tar"):
        prepare_imagenet(str(tmp_path / "dst"), train_tar=str(tmp_path / "flat.tar"), verify_checksums=False)
    assert not (tmp_path / "dst").exists()


def test_hidden_and_os_files_of_a_kaggle_copy_are_skipped_and_listed(tmp_path, capsys):
    src, dst = write_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    data = src / "ILSVRC/Data/CLS-LOC"
    for name, content in {  # what macOS Finder, archivers and Windows leave in a copied tree
        "val/.DS_Store": b"\x00\x00\x00\x01Bud1",  # in the flat val folder: was refused as an unexpected file
        "train/n02000001/._n02000001_1.JPEG": APPLE_DOUBLE,  # named like an image: was copied as one
        "train/n02000001/Thumbs.db": b"thumbnails",
        "train/.hidden/n09000009_1.JPEG": jpeg(9),  # a folder among the classes: was refused, must be no class
        "train/__MACOSX/n01000003/._n01000003_1.JPEG": APPLE_DOUBLE,
    }.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(content)
    counts = prepare_imagenet(str(dst), src=str(src))
    assert tree(dst) == expected_tree()  # no hidden file, no extra class
    assert counts["hidden_skipped"] == 5 and counts["train_classes"] == 3
    assert capsys.readouterr().out.splitlines()[-5:] == [
        *SUMMARY,
        f"  skipped: hidden and OS files in the sources: 5 ({data}/train/.hidden/, {data}/train/__MACOSX/, "
        f"{data}/train/n02000001/._n02000001_1.JPEG, ...)",
    ]
    assert find_classes(dst / "train") == ["n01000003", "n02000001", "n03000002"]
    # A rerun reads no class folder already in dst: it lists what it read (the top of train/, val/).
    assert prepare_imagenet(str(dst), src=str(src))["hidden_skipped"] == 3
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"  skipped: hidden and OS files in the sources: 3 ({data}/train/.hidden/, {data}/train/__MACOSX/, "
        f"{data}/val/.DS_Store)"
    )


def test_hidden_and_os_members_of_the_official_tars_are_skipped_and_listed(tmp_path, capsys):
    src, dst = write_official(tmp_path / "ilsvrc", hidden=True), tmp_path / "imagenet"
    counts = prepare_imagenet(str(dst), src=str(src), verify_checksums=False)
    assert tree(dst) == expected_tree() and counts["hidden_skipped"] == 4
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"  skipped: hidden and OS files in the sources: 4 ({src / TRAIN_TAR}:._n01000003.tar, "
        f"{src / TRAIN_TAR}:n01000003.tar:._n01000003_1.JPEG, {src / VAL_TAR}:.DS_Store, ...)"
    )


@pytest.mark.parametrize("damaged", [DEVKIT, VAL_TAR, TRAIN_TAR])
def test_a_checksum_mismatch_names_the_file_and_writes_nothing(official, tmp_path, monkeypatch, damaged):
    # The fakes' own MD5 stands in for the published one of the other two files: `damaged` is checked last.
    for name in {TRAIN_TAR, VAL_TAR, DEVKIT} - {damaged}:
        monkeypatch.setitem(prepare.MD5, name, md5(official / name))
    dst = tmp_path / "imagenet"
    with pytest.raises(ChecksumError) as error:
        prepare_imagenet(str(dst), src=str(official))
    assert str(error.value) == (
        f"{official / damaged}: MD5 {md5(official / damaged)}, the published {damaged} has {PUBLISHED_MD5[damaged]}: "
        "the file is damaged or incomplete. Download it again, or pass --verify_checksums false to use it as it is"
    )
    assert not dst.exists()


def test_matching_checksums_are_reported_and_verify_checksums_false_skips_them(official, tmp_path, monkeypatch,
                                                                               capsys):
    assert prepare.MD5 == PUBLISHED_MD5
    prepare_imagenet(str(tmp_path / "unchecked"), src=str(official), verify_checksums=False)
    assert tree(tmp_path / "unchecked") == expected_tree()
    assert not [line for line in capsys.readouterr().out.splitlines() if "MD5" in line]
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        monkeypatch.setitem(prepare.MD5, name, md5(official / name))
    prepare_imagenet(str(tmp_path / "checked"), src=str(official))
    assert tree(tmp_path / "checked") == {**expected_tree(), ".prepare_verified.json": ANY}
    assert [line for line in capsys.readouterr().out.splitlines() if "MD5" in line] == [
        f"{official / name}: checking MD5, 100% of 0.0 MB" for name in (DEVKIT, VAL_TAR, TRAIN_TAR)
    ]


def test_a_rerun_does_not_hash_the_verified_files_again_until_one_changes(official, tmp_path, monkeypatch, capsys):
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        monkeypatch.setitem(prepare.MD5, name, md5(official / name))
    dst = tmp_path / "imagenet"
    record = dst / ".prepare_verified.json"
    checked = [f"{official / name}: checking MD5, 100% of 0.0 MB" for name in (DEVKIT, VAL_TAR, TRAIN_TAR)]
    before = [f"{official / name}: MD5 verified before ({record})" for name in (DEVKIT, VAL_TAR, TRAIN_TAR)]

    def md5_lines():
        return [line for line in capsys.readouterr().out.splitlines() if "MD5" in line]

    def identity(name):
        stat = (official / name).stat()
        return {"path": str((official / name).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "md5": md5(official / name)}

    prepare_imagenet(str(dst), src=str(official))
    assert md5_lines() == checked
    assert json.loads(record.read_text()) == {name: identity(name) for name in (TRAIN_TAR, VAL_TAR, DEVKIT)}
    assert sorted(p.name for p in dst.iterdir()) == [".prepare_verified.json", "train", "val"]  # no .part left
    # The resume of a stopped copy: no file hashed again, the missing image written.
    (dst / "val/n02000001/ILSVRC2012_val_00000003.JPEG").unlink()
    assert prepare_imagenet(str(dst), src=str(official))["val_images_written"] == 1
    assert md5_lines() == before
    assert tree(dst) == {**expected_tree(), ".prepare_verified.json": record.read_bytes()}
    # A touched train tar (another mtime, same size and bytes) is hashed again, and recorded with its new mtime.
    mtime = (official / TRAIN_TAR).stat().st_mtime_ns
    os.utime(official / TRAIN_TAR, ns=(mtime + 5 * 10**9, mtime + 5 * 10**9))
    prepare_imagenet(str(dst), src=str(official))
    assert md5_lines() == [*before[:2], checked[2]]
    assert json.loads(record.read_text())[TRAIN_TAR]["mtime_ns"] == mtime + 5 * 10**9
    prepare_imagenet(str(dst), src=str(official))
    assert md5_lines() == before
    # A digest recorded for other published MD5s is no match; neither is a damaged record.
    monkeypatch.setitem(prepare.MD5, DEVKIT, PUBLISHED_MD5[DEVKIT])
    with pytest.raises(ChecksumError, match=rf"the published {DEVKIT} has {PUBLISHED_MD5[DEVKIT]}"):
        prepare_imagenet(str(dst), src=str(official))
    assert md5_lines() == checked[:1]
    monkeypatch.setitem(prepare.MD5, DEVKIT, md5(official / DEVKIT))
    record.write_text("{")
    prepare_imagenet(str(dst), src=str(official))
    assert md5_lines() == checked
    assert json.loads(record.read_text()) == {name: identity(name) for name in (TRAIN_TAR, VAL_TAR, DEVKIT)}


def test_each_file_is_synced_whole_before_its_rename_and_the_folders_after(tmp_path, monkeypatch):
    src, dst = write_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    monkeypatch.setattr(prepare, "VAL_BATCH", 4)  # the 6 val images: a batch of 4, then one of 2
    fsync, synced = prepare.fsync_path, []

    def record(path):  # where the file is when it is synced, what it holds, how many val images have their name
        renamed = sum(p.is_file() for p in (dst / "val").rglob("*"))
        synced.append((str(path.relative_to(dst)), path.read_bytes() if path.is_file() else None, renamed))
        fsync(path)

    monkeypatch.setattr(prepare, "fsync_path", record)
    prepare_imagenet(str(dst), src=str(src))
    # Every image synced whole under its temporary name (so before its rename): train/<wnid>/x, val/x.
    files = {name: data for name, data, _ in synced if data is not None}
    assert files == {".prepare_tmp/" + (k if k.startswith("train/") else "val/" + k.rsplit("/", 1)[1]): v
                     for k, v in expected_tree().items()}
    # By batch: the 4 images of the first all synced before any is renamed, the 2 of the second after those 4.
    assert [renamed for name, _, renamed in synced if name.startswith(".prepare_tmp/val/")] == [0, 0, 0, 0, 4, 4]
    # A class folder synced before its rename, train/ after it; the val class folders, then val/, after the renames.
    assert [name for name, data, _ in synced if data is None] == [
        ".prepare_tmp/train/n01000003", "train", ".prepare_tmp/train/n02000001", "train",
        ".prepare_tmp/train/n03000002", "train", "val/n01000003", "val/n02000001", "val/n03000002", "val",
    ]


def test_prepare_demo_says_what_it_wrote_or_kept(tmp_path):
    args = ("prepare", "demo", "--dst", str(tmp_path / "d"), "--train_per_class", "2", "--val_per_class", "1")
    first = run_resnet(*args).stdout
    assert f"resnet prepare demo: 12 train / 6 val images in {tmp_path / 'd'}" in first and "kept" not in first
    again = run_resnet(*args).stdout
    assert f"{tmp_path / 'd'}: the demo dataset with this spec is there already: kept" in again
    assert "kept" not in run_resnet(*args[:-1], "2").stdout  # another --val_per_class: written again
