"""Node-local copies (`data.stage_dir`, datamodules/staging.py): copied once, checked by size and SHA-256, reused
while valid, made again when damaged or when the source changed; the run reads the copy. Two processes of one node
copy once. The SLURM tests (tests/test_slurm.py) stage into each node's own scratch folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.dataset_check import check_dataset
from datamodules.imagenet import ImageNetDataModule
from datamodules.staging import RECORD, StagingError, beton_plan, read_record, stage, stage_root
from tests.conftest import REPO


def datamodule(root: Path, stage_dir: Path, **kw) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), stage_dir=str(stage_dir), batch_size=8, num_workers=0, crop_size=32,
                              val_resize_size=36, **kw)


def images(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*")) if p.is_file()}


def test_folders_copied_once_checked_reused_and_made_again(demo_copy, tmp_path, capsys, caplog):
    (demo_copy / "train" / "n90000001" / ".DS_Store").write_bytes(b"\0" * 10)  # never a sample: never copied
    (demo_copy / "val" / "n90000002" / "._x.JPEG").write_bytes(b"\0" * 10)
    local = tmp_path / "local"
    dm = datamodule(demo_copy, local)
    dm.prepare_data()
    out = capsys.readouterr().out
    copy = stage_root(str(local), demo_copy, "folders")
    assert f"Staged {demo_copy} on " in out and f"copied in {copy}" in out and ": 102 files (" in out
    source = {k: v for k, v in images(demo_copy).items() if "/." not in k}
    assert images(copy) == source and len(source) == 72 + 30  # byte for byte, hidden files left behind

    dm.setup("fit")  # the run reads the copy
    assert {Path(p).parent.parent.parent for p, _ in dm.train_set.samples + dm.val_set.samples} == {copy}
    assert len(dm.train_set) == 72 and len(dm.val_set) == 30 and dm.num_classes == 6

    # A requeued job on this node: the copy is reused after its hash is checked (no file written again).
    first = (copy / "train" / "n90000001").iterdir().__next__()
    inode = first.stat().st_ino
    datamodule(demo_copy, local).prepare_data()
    assert "102 files" in capsys.readouterr().out and first.stat().st_ino == inode

    # Damaged in place (same size): found by the hash; cut short: found by the size. Copied again each time.
    damaged = bytearray(first.read_bytes())
    damaged[100] ^= 0xFF
    first.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        datamodule(demo_copy, local).prepare_data()
    assert "SHA-256 differs" in caplog.text and images(copy) == source
    caplog.clear()
    first.write_bytes(first.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        datamodule(demo_copy, local).prepare_data()
    assert f"{first}: 50 bytes" in caplog.text and images(copy) == source
    caplog.clear()

    # The source changed (an image added): a stale copy is not used.
    (demo_copy / "train" / "n90000003" / "added.JPEG").write_bytes(first.read_bytes())
    with caplog.at_level(logging.WARNING):
        datamodule(demo_copy, local).prepare_data()
    assert f"its source {demo_copy} changed" in caplog.text and "train/n90000003/added.JPEG" in images(copy)
    assert "103 files" in capsys.readouterr().out


def test_a_checked_copy_carries_the_manifest_over(demo_copy, tmp_path, capsys):
    """With a manifest, the copy has it too: no rank lists the copy, and files it marks bad are left behind."""
    (demo_copy / "train" / "n90000004" / "empty.JPEG").write_bytes(b"")
    check_dataset(str(demo_copy), workers=1)
    dm = datamodule(demo_copy, tmp_path / "local")
    dm.prepare_data()
    copy = stage_root(str(tmp_path / "local"), demo_copy, "folders")
    assert not (copy / "train" / "n90000004" / "empty.JPEG").exists()
    dm.setup("fit")
    assert dm._sample_source == f"manifest {copy / '.resnet-manifest.json.gz'}" and len(dm.train_set) == 72


def test_two_processes_of_a_node_copy_once(demo_root, tmp_path):
    code = ("import sys; from pathlib import Path; from datamodules.staging import folder_plan, stage, stage_root, "
            "describe; root = Path(sys.argv[1]); plan = folder_plan(root, stage_root(sys.argv[2], root, 'folders')); "
            "print(describe(stage(plan), plan))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(demo_root), str(tmp_path / "local")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(" copied in " in o for o in outs) == [False, True], outs  # one copied, one reused the copy
    assert sum("reused (SHA-256 checked)" in o for o in outs) == 1


def test_betons_staged_and_read(demo_root, tmp_path, capsys):
    ffcv = tmp_path / "ffcv"
    ffcv.mkdir()
    for name in ("train.beton", "val.beton"):  # stand-ins: staging copies bytes; test_ffcv reads staged betons
        (ffcv / name).write_bytes(os.urandom(3000))
    local = tmp_path / "local"
    dm = ImageNetDataModule(root=str(demo_root), backend="ffcv", ffcv={"dir": str(ffcv)}, stage_dir=str(local),
                            batch_size=8, num_workers=0)
    dm.prepare_data()
    copy = stage_root(str(local), ffcv, "ffcv")
    assert "2 files (0.0 MB) copied" in capsys.readouterr().out
    assert (copy / "val.beton").read_bytes() == (ffcv / "val.beton").read_bytes()
    assert read_record(copy)["key"]["files"]["train.beton"][0] == 3000
    dm.setup("fit")
    assert dm.loaders.dir == copy
    (ffcv / "val.beton").write_bytes(os.urandom(2000))  # rewritten by `resnet prepare ffcv`: copied again
    staged = stage(beton_plan(ffcv, copy, ("val",)))
    assert staged.copied and (copy / "val.beton").stat().st_size == 2000 and (copy / RECORD).is_file()


def test_staging_errors_name_the_cause(demo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_NO_SUCH_VAR", raising=False)
    with pytest.raises(StagingError, match=r"data.stage_dir=\$RESNET_NO_SUCH_VAR/x: .* unset variable"):
        datamodule(demo_root, "$RESNET_NO_SUCH_VAR/x").prepare_data()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StagingError, match=f"data.stage_dir: cannot use {blocker}"):
        datamodule(demo_root, blocker).prepare_data()
    with pytest.raises(Exception, match=r"no train.beton"):
        ImageNetDataModule(root=str(demo_root), backend="ffcv", ffcv={"dir": str(tmp_path)}, stage_dir=str(tmp_path / "l"),
                           batch_size=8).prepare_data()
