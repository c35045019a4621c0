"""Real ImageNet copies: `resnet prepare check` reports every planted defect by path and writes a manifest; every
backend reads the same usable samples; unreadable images are skipped (training, counted over the run) or refused
(validation) with their paths; ranks start from the manifest, or from one rank's scan, without listing folders."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from datamodules.folder import CorruptImageError, DatasetLayoutError, decode, find_classes, scan_split
from datamodules.imagenet import ImageNetDataModule
from datamodules.manifest import NAME, find_manifest
from tests.conftest import last_metrics, run_resnet, tiny_fit_args
from tests.odd_imagenet import write_odd_copy


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, dict]:
    """The odd copy, checked: (root, planted defects); its manifest lies in the root."""
    root = tmp_path_factory.mktemp("odd") / "imagenet"
    planted = write_odd_copy(root)
    proc = run_resnet("prepare", "check", "--root", str(root), timeout=180)  # a hang fails the test
    planted["stdout"] = proc.stdout
    return root, planted


def sections(report: str) -> dict[str, str]:
    """The report file's text by kind: "kind (N): what" lines open a section."""
    out: dict[str, str] = {}
    kind = None
    for line in report.splitlines():
        if not line.startswith(" ") and " (" in line and "):" in line:
            kind = line.split(" (")[0]
            out[kind] = ""
        elif kind:
            out[kind] += line + "\n"
    return out


def test_check_reports_each_planted_defect_by_path_and_writes_the_manifest(odd):
    root, planted = odd
    report = (root / ".resnet-manifest.report.txt").read_text()
    by_kind = sections(report)
    for kind in ("empty", "truncated", "corrupt", "convert", "extension", "hidden", "other", "leak"):
        for rel in planted[kind]:
            assert rel in by_kind.get(kind, ""), (kind, rel, by_kind.get(kind))
    assert "gray16.png: 16-bit+gray" in by_kind["convert"] and "rgb16.png: 16-bit" in by_kind["convert"]
    assert "cmyk.JPEG: cmyk" in by_kind["convert"] and "png_named.JPEG: PNG content" in by_kind["extension"]
    assert "gif_named.JPEG: GIF content" in by_kind["extension"]
    # Read as ordinary images: nothing said of them.
    assert "progressive" not in report and "exif_rotated" not in report
    assert "planted_defects" not in by_kind and "ILSVRC2012: 1281167" in report  # the counts against the real set
    assert "interrupted_copy.JPEG" in planted["stdout"]  # printed too, not only in the file
    state = json.loads(gzip.decompress((root / NAME).read_bytes()))
    for split in ("train", "val"):
        usable = sorted(f"{split}/{rel}" for rel, *_ in state["files"][split])
        assert usable == planted[f"readable_{split}"]
    assert sorted(f"train/{rel}" for rel, *_ in state["bad"]["train"]) == sorted(
        planted["empty"] + planted["truncated"] + planted["corrupt"])
    assert state["classes"] == find_classes(root / "train")  # hidden folders are no classes
    assert len(state["classes"]) == 6


def test_every_readable_image_is_8_bit_rgb(odd):
    root, planted = odd
    for rel in planted["convert"] + planted["extension"]:
        image = decode(str(root / rel))
        assert image.dtype == torch.uint8 and image.shape[0] == 3, rel
    gray16 = decode(str(root / planted["convert"][4]))
    assert int(gray16.max()) > 200 and torch.equal(gray16[0], gray16[2])  # scaled from 16 bits, not clipped
    for rel in planted["empty"] + planted["truncated"] + planted["corrupt"]:
        with pytest.raises(CorruptImageError, match=str(root / rel)):
            decode(str(root / rel))


def test_the_folder_scan_and_the_manifest_give_the_same_samples_but_the_unreadable(odd):
    root, planted = odd
    classes = find_classes(root / "train")
    scanned = scan_split(root / "train", {c: i for i, c in enumerate(classes)})
    assert not any("/." in path or "__MACOSX" in path for path, _ in scanned)  # hidden files are no samples
    manifest = find_manifest(root)
    unreadable = {str(root / rel) for rel in planted["empty"] + planted["truncated"] + planted["corrupt"]}
    assert manifest.samples("train") == [s for s in scanned if s[0] not in unreadable]
    assert sorted(manifest.bad_paths("train")) == sorted(unreadable)


def test_a_changed_folder_makes_the_manifest_stale(odd, tmp_path, caplog):
    root, _ = odd
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    run_resnet("prepare", "check", "--root", str(copy), "--manifest", str(tmp_path / "m.json.gz"), timeout=180)
    assert find_manifest(copy, str(tmp_path / "m.json.gz")) is not None
    wnid = find_classes(copy / "train")[0]
    shutil.copyfile(next((copy / "train" / wnid).glob("*_1.JPEG")), copy / "train" / wnid / "added.JPEG")
    with pytest.raises(DatasetLayoutError, match="stale"):
        find_manifest(copy, str(tmp_path / "m.json.gz"))
    # The manifest copied with the tree is of another root: not used (the folders are listed), with a warning.
    assert find_manifest(copy) is None
    assert "a manifest of" in caplog.text


def test_a_read_only_root_gets_its_manifest_in_the_cache(odd, tmp_path, monkeypatch):
    root, _ = odd
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".resnet-manifest*"))
    (copy / NAME).mkdir()  # the root's place cannot take the file (tests run as root: chmod would not stop it)
    monkeypatch.setenv("RESNET_CACHE", str(tmp_path / "cache"))
    from datamodules.dataset_check import check_dataset

    out = check_dataset(str(copy), workers=1)
    assert Path(out["manifest"]).parent == tmp_path / "cache"
    (copy / NAME).rmdir()
    assert find_manifest(copy).path == Path(out["manifest"])


def test_a_dangling_symbolic_link_is_named_with_its_target(demo_copy, tmp_path):
    from datamodules.dataset_check import check_dataset

    c = sorted(os.listdir(demo_copy / "train"))[0]
    os.symlink(tmp_path / "moved" / "a.JPEG", demo_copy / "train" / c / "moved_away.JPEG")  # a copy that moved
    os.symlink(tmp_path / "moved" / "n0", demo_copy / "val" / "n0")  # a class folder likewise
    check_dataset(str(demo_copy), workers=1)
    report = (demo_copy / ".resnet-manifest.report.txt").read_text()
    by_kind = sections(report)
    assert f"train/{c}/moved_away.JPEG -> {tmp_path}/moved/a.JPEG" in by_kind["dangling"], report
    assert f"val/n0 -> {tmp_path}/moved/n0" in by_kind["dangling"] and "moved_away" not in by_kind.get("other", "")
    classes = find_classes(demo_copy / "train")
    samples = scan_split(demo_copy / "train", {k: i for i, k in enumerate(classes)})
    assert len(samples) == 72 and not any("moved_away" in path for path, _ in samples)  # never a sample


class _Rank:
    def __init__(self, rank: int, world: int = 1, run_dir: str | None = None):
        self.global_rank, self.world_size = rank, world
        self.strategy = type("S", (), {"root_device": torch.device("cpu")})()
        self.default_root_dir = run_dir


def _datamodule(root: Path, rank: int = 0, world: int = 1, run_dir: str | None = None, **options):
    dm = ImageNetDataModule(str(root), batch_size=8 * world, num_workers=0, crop_size=32, val_resize_size=36,
                            **options)
    dm.trainer = _Rank(rank, world, run_dir)
    return dm


def test_unreadable_images_skipped_in_training_over_the_run_and_refused_in_validation(odd, tmp_path):
    root, planted = odd
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".resnet-manifest*"))  # no manifest: read them
    dm = _datamodule(copy, run_dir=str(tmp_path / "run"), max_corrupt_train_images=3)
    dm.setup("fit")
    labels = [dm.train_set[i][1] for i in range(len(dm.train_set))]  # every sample, the unreadable ones replaced
    assert len(labels) == len(dm.train_set)
    skipped = (tmp_path / "run" / "skipped_images.txt").read_text()
    assert sorted({line.split("\t")[0] for line in skipped.splitlines()}) == sorted(
        str(copy / rel) for rel in planted["empty"] + planted["truncated"] + planted["corrupt"])
    # The limit counts the whole run: a restart (or a second epoch, or another rank) meets the paths recorded so
    # far; with a lower limit it stops at its first skip, naming the files.
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")  # a restart of the run: it resumes
    dm = _datamodule(copy, run_dir=str(tmp_path / "run"), max_corrupt_train_images=2)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"3 unreadable training images in this run.*interrupted_copy"):
        for _ in dm.train_dataloader():
            pass
    bad_val = copy / "val" / find_classes(copy / "val")[0] / "zero.JPEG"
    bad_val.write_bytes(b"")
    dm = _datamodule(copy)
    dm.setup("validate")
    with pytest.raises(CorruptImageError, match=str(bad_val)):
        for _ in dm.val_dataloader():
            pass
    run_resnet("prepare", "check", "--root", str(copy), timeout=180)
    with pytest.raises(DatasetLayoutError, match=rf"1 validation images are unreadable.*{bad_val}"):
        _datamodule(copy).setup("validate")  # with a manifest: refused before anything runs


def _rank_sets_up(rank: int, root: str, port: int, out: str) -> None:
    """One of two gloo ranks: DataModule.setup("fit") with every directory listing recorded (an audit hook)."""
    import torch.distributed as dist

    listed: list[str] = []
    sys.addaudithook(lambda event, args: listed.append(str(args[0])) if event in ("os.scandir", "os.listdir")
                     and args and str(args[0]).startswith(root) else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dm = _datamodule(Path(root), rank, 2)
    dm.setup("fit")
    torch.save({"listed": listed, "train": dm.train_set.samples, "val": dm.val_set.samples, "classes": dm.classes},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("with_manifest", [True, False])
def test_two_ranks_start_from_the_manifest_or_one_scan_without_listing_the_class_folders(odd, tmp_path,
                                                                                         with_manifest):
    root, planted = odd
    if not with_manifest:
        root = Path(shutil.copytree(root, tmp_path / "copy", ignore=shutil.ignore_patterns(".resnet-manifest*")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_sets_up, args=(str(root), port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["train"] == ranks[1]["train"] and ranks[0]["val"] == ranks[1]["val"]
    assert ranks[1]["listed"] == []  # rank 1 lists nothing: it gets rank 0's answer
    class_folders = [p for p in ranks[0]["listed"] if os.path.dirname(p.rstrip("/")) in
                     (str(root / "train"), str(root / "val"))]
    if with_manifest:  # rank 0 lists the two split folders (the manifest's key), not one class folder
        assert class_folders == [] and sorted(set(ranks[0]["listed"])) == [str(root / "train"), str(root / "val")]
        assert len(ranks[0]["train"]) == len(planted["readable_train"])
    else:
        assert len(class_folders) == 12  # 6 classes x 2 splits, listed once, by rank 0
        assert len(ranks[0]["train"]) == len(planted["readable_train"]) + 3  # unreadable ones are skipped later


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_each_backend_fits_and_validates_on_the_odd_copy_with_the_manifests_samples(odd, tmp_path, backend):
    """One epoch and its validation: every readable image once, the unreadable ones never met (none skipped)."""
    root, planted = odd
    extra = []
    if backend != "torchvision":
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
        extra = ["--data.backend", backend] + (["--data.dali.device", "cpu"] if backend == "dali" else [])
    if backend == "ffcv":
        beton = tmp_path / "ffcv"
        from datamodules.ffcv_write import prepare_ffcv  # in-process: `resnet prepare ffcv` has its own tests

        prepare_ffcv(str(root), str(beton), workers=2)
        extra += ["--data.ffcv.dir", str(beton)]
    run_dir = tmp_path / "run"
    run_resnet(*tiny_fit_args(root, run_dir, "--trainer.max_epochs", "1", "--data.num_workers", "1", *extra),
               timeout=300)
    metrics = last_metrics(run_dir)
    assert metrics["val/images"] == len(planted["readable_val"])
    train = len(planted["readable_train"]) - (len(planted["not_for_dali"]) if backend == "dali" else 0)
    assert metrics["step"] == train // 8 - 1  # whole batches of 8; the epoch-end validation's row: the last step
    assert not (run_dir / "skipped_images.txt").exists()  # the manifest left the unreadable ones out
    # The same validation samples and labels, in the manifest's order (one rank reads its shard in order).
    dm = _datamodule(root, backend=backend, dali={"device": "cpu"}, ffcv={"dir": str(beton) if backend == "ffcv" else None})
    dm.setup("validate")
    labels = [int(y) for _, ys in dm.val_dataloader() for y in ys]
    assert labels == [label for _, label in find_manifest(root).samples("val")]


def test_a_flat_val_folder_points_to_prepare_imagenet(odd, tmp_path):
    root, _ = odd
    copy = tmp_path / "copy"
    shutil.copytree(root / "train", copy / "train")
    (copy / "val").mkdir()
    shutil.copyfile(next((root / "train").glob("*/*_1.JPEG")), copy / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetLayoutError, match=r"images directly in it .* `resnet prepare imagenet --dst"):
        _datamodule(copy).setup("fit")
    proc = run_resnet("prepare", "check", "--root", str(copy), expect_rc=2, timeout=120)
    assert "resnet prepare imagenet" in proc.stderr and "Traceback" not in proc.stderr


def test_a_stray_class_folder_is_named_in_the_class_count_error(odd, tmp_path):
    root, _ = odd  # its hidden folders (.hidden_class, __MACOSX) are no classes: 6, as the model's
    from train.model import ImageNetClassifier

    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".resnet-manifest*"))
    shutil.copytree(copy / "train" / ".hidden_class", copy / "train" / "backup of n90000001")
    dm = _datamodule(copy)
    dm.setup("fit")
    model = ImageNetClassifier(arch="resnet18", num_classes=6)
    model.trainer = type("T", (), {"datamodule": dm})()
    with pytest.raises(DatasetLayoutError, match=r"holds 7 class folders, among them \['backup of n90000001'\]"):
        model.setup("fit")


def test_a_resume_over_another_sample_list_is_named(odd, caplog):
    root, _ = odd
    dm = _datamodule(root)
    dm.setup("fit")
    state = {"classes": dm.classes, "train_position": {"epoch": 1, "samples": 16, "world_size": 1, "batch_size": 8},
             "train_samples": {**dm.state_dict()["train_samples"]}}
    dm.load_state_dict(state)
    assert "drawn over" not in caplog.text
    state["train_samples"]["count"] += 3  # e.g. written before a manifest left 3 unreadable images out
    dm.load_state_dict(state)
    assert f"drawn over {state['train_samples']['count']} images, this run has {len(dm.train_set)}" in caplog.text


def test_a_fresh_run_starts_its_skip_record_anew_a_resumed_one_keeps_it(odd, tmp_path):
    root, _ = odd
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "skipped_images.txt").write_text("/old/run/bad.JPEG\tempty file (0 bytes)\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    _datamodule(root, run_dir=str(run)).setup("fit")
    assert (run / "skipped_images.txt").is_file()  # a resume: the run's skips so far count
    (run / "checkpoints" / "last.ckpt").unlink()
    _datamodule(root, run_dir=str(run)).setup("fit")
    assert not (run / "skipped_images.txt").exists()  # a fresh run: an earlier run's skips do not


def _rank_meets_a_fault(rank: int, root: str, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _datamodule(Path(root), rank, 2, manifest=f"{out}/absent.json.gz").setup("fit")
        message = "no error"
    except DatasetLayoutError as e:
        message = str(e)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_a_fault_found_on_rank_0_is_raised_on_every_rank(odd, tmp_path):
    root, _ = odd
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_meets_a_fault, args=(str(root), port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # both ranks end with rank 0's error: none waits in the broadcast
        assert "absent.json.gz: no such file" in (tmp_path / f"rank{rank}.txt").read_text()


def test_every_leaked_val_copy_is_listed_and_a_missing_root_is_named(odd, tmp_path):
    root, _ = odd
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".resnet-manifest*"))
    wnid = find_classes(copy / "train")[0]
    source = next((copy / "train" / wnid).glob("*_1.JPEG"))
    for name in ("copy_a.JPEG", "copy_b.JPEG"):  # two val copies of one train image: two leaks, not one
        shutil.copyfile(source, copy / "val" / wnid / name)
    from datamodules.dataset_check import check_dataset

    leaks = check_dataset(str(copy), workers=1)["problems"]["leak"]
    assert sum(f"{name}.JPEG = train/{wnid}/{source.name}" in line for line in leaks for name in ("copy_a", "copy_b")) == 2
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        check_dataset(str(tmp_path / "absent"), workers=1)
