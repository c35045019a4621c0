import logging
import shutil

import pytest
import torch

from datamodules import ImageNetDataModule
from datamodules.folder import CorruptImageError, DatasetLayoutError
from datamodules.loaders import EvalShardBatchSampler
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, Lighting, normalize_batch, train_transform, val_transform
from torchvision.io import decode_image, read_file
from torchvision.transforms import v2


def make_dm(root, **kw):
    kw = {"batch_size": 4, "num_workers": 0, "crop_size": 32, "val_resize_size": 36, **kw}
    return ImageNetDataModule(str(root), **kw)


def first_jpeg(root, split="val"):
    return sorted((root / split).glob("*/*.JPEG"))[0]


def test_layout_and_batches(demo_root):
    dm = make_dm(demo_root)
    dm.setup("fit")
    assert dm.num_classes == 6 and dm.classes == sorted(dm.classes) and dm.classes[0] == "n90000001"
    assert len(dm.train_set) == 72 and len(dm.val_set) == 30
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.long
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    assert torch.allclose(x[:, 0], (images[:, 0].float() / 255 - 0.485) / 0.229, atol=1e-5)
    seen = torch.cat([y for _, y in dm.val_dataloader()])
    assert seen.tolist() == [label for _, label in dm.val_set.samples]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: shutil.rmtree(r / "train"), r"imagenet/train: missing"),
        (lambda r: shutil.rmtree(r / "val"), r"imagenet/val: missing"),
        (lambda r: [p.unlink() for p in (r / "train/n90000003").iterdir()], r"train/n90000003: empty class folder"),
        (lambda r: (r / "val/n90000003").rename(r / "val/n99999999"), r"val/n99999999: class 'n99999999' is not among"),
    ],
    ids=["no-train", "no-val", "empty-class", "val-class-not-in-train"],
)
def test_layout_errors_name_the_path(demo_copy, damage, message):
    damage(demo_copy)
    with pytest.raises(DatasetLayoutError, match=message):
        make_dm(demo_copy).setup("fit")


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_val_jpeg_is_an_error_naming_it(demo_copy, kind):
    bad = first_jpeg(demo_copy)
    data = bad.read_bytes()
    bad.write_bytes(b"not a jpeg" * 50 if kind == "corrupt" else data[: len(data) // 2])
    dm = make_dm(demo_copy, num_workers=1)  # through a real worker process: no silent worker crash
    dm.setup("validate")
    with pytest.raises(CorruptImageError, match=str(bad)):
        list(dm.val_dataloader())


def test_few_corrupt_train_jpegs_are_skipped_with_a_warning(demo_copy, caplog):
    bad = sorted((demo_copy / "train").glob("*/*.JPEG"))[:2]
    for p in bad:
        p.write_bytes(p.read_bytes()[:300])
    dm = make_dm(demo_copy, max_corrupt_train_images=2)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="datamodules.folder"):
        labels = [y for _, y in (dm.train_set[i] for i in range(len(dm.train_set)))]
    assert len(labels) == 72
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and str(bad[0]) in warned[0] and "(1 in this run" in warned[0] and "(2 in this run" in warned[1]
    dm = make_dm(demo_copy, max_corrupt_train_images=1)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=str(bad[1])):
        [dm.train_set[i] for i in range(len(dm.train_set))]


def test_global_batch_must_divide_by_world_size(demo_root):
    dm = make_dm(demo_root, batch_size=10)
    dm.trainer = type("T", (), {"global_rank": 0, "world_size": 4})()
    with pytest.raises(ValueError, match=r"data.batch_size=10 .* world size 4 .* e.g. use 8"):
        dm.per_device_batch_size


def test_lightning_distributed_sampler_is_refused(demo_root):
    """Lightning's DistributedSampler would pad validation with duplicates: a clear error, not wrong numbers."""
    dm = make_dm(demo_root)
    connector = type("C", (), {"use_distributed_sampler": True})()
    dm.trainer = type("T", (), {"global_rank": 0, "world_size": 2, "_accelerator_connector": connector})()
    with pytest.raises(ValueError, match="trainer.use_distributed_sampler must be false"):
        dm.setup("validate")


@pytest.mark.parametrize("n, world, batch", [(30, 2, 4), (33, 2, 16), (101, 4, 8), (7, 3, 4), (1000, 8, 32), (30, 4, 1), (5, 4, 1)])
def test_eval_shards_cover_each_image_once_with_equal_batch_counts(n, world, batch):
    shards = [list(EvalShardBatchSampler(n, batch, rank, world)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of batches on every rank (DDP syncs per forward)
    flat = [i for s in shards for b in s for i in b]
    assert sorted(flat) == list(range(n))
    # One image a batch over unequal shards (30 on 4 ranks: 8, 8, 7, 7): the larger shards' last batch holds two.
    assert all(0 < len(b) <= max(batch, 2 if n % world else 1) for s in shards for b in s)
    assert sum(len(b) > batch for s in shards for b in s) == (n % world if batch == 1 else 0)


def test_eval_shards_refuse_fewer_images_than_ranks_on_every_rank():
    for rank in range(4):
        with pytest.raises(ValueError, match="3 evaluation images cannot be shared by 4 ranks"):
            EvalShardBatchSampler(3, 1, rank, 4)


def test_train_transforms(demo_root):
    image = decode_image(read_file(str(first_jpeg(demo_root, "train"))))
    torch.manual_seed(0)
    rrc = train_transform(crop_size=48)
    assert rrc(image).shape == (3, 48, 48) and rrc(image).dtype == torch.uint8
    jitter = train_transform(crop_size=48, scale_jitter=(64, 80), lighting_std=0.1)
    assert jitter(image).shape == (3, 48, 48)
    flips = sum(torch.equal(train_transform(crop_size=image.shape[1], scale=(1, 1))(image[:, :, : image.shape[1]]).flip(-1), image[:, :, : image.shape[1]]) for _ in range(200))
    assert 70 < flips < 130  # about half of the crops are mirrored
    lit = Lighting(0.1)(image)
    assert lit.dtype == torch.uint8 and lit.shape == image.shape and not torch.equal(lit, image)
    assert (lit.float() - image.float()).abs().mean() < 20


def test_val_transform_geometry(demo_root):
    image = decode_image(read_file(str(first_jpeg(demo_root))))
    out = val_transform(crop_size=32, resize_size=36)(image)
    # Shorter side to 36 (antialiased bilinear), then the centre 32 x 32, by hand.
    resized = v2.functional.resize(image, 36, antialias=True)
    top, left = round((resized.shape[1] - 32) / 2), round((resized.shape[2] - 32) / 2)
    assert min(resized.shape[1:]) == 36 and torch.equal(out, resized[:, top : top + 32, left : left + 32])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(normalize_batch(out[None])[0], (out.float() / 255 - mean) / std, atol=1e-6)


def _slow_start_worker(worker_id: int) -> None:
    """init_loader_worker, late: the job signals reach the worker before it sets its own handling."""
    import time

    from datamodules.loaders import init_loader_worker

    time.sleep(1.0)
    init_loader_worker(worker_id)


def test_loader_workers_survive_job_signals_sent_while_they_start():
    """SLURM signals every process of a step: a SIGTERM or SIGUSR1 that reaches a worker before its init function
    ran killed it ("DataLoader worker killed by signal: Terminated", seen at a preemption on the 2-node cluster)."""
    import os
    import subprocess
    import time
    from pathlib import Path

    from datamodules.folder import WorkerSafeLoader

    def children() -> set[int]:
        return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == os.getpid()}

    loader = WorkerSafeLoader(list(range(8)), batch_size=4, num_workers=2, worker_init_fn=_slow_start_worker)
    before = children()  # other tests' processes may still be around
    batches = iter(loader)
    deadline = time.monotonic() + 10
    workers: set[int] = set()
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = children() - before
    assert len(workers) == 2
    for pid in workers:  # before their init function (it sleeps 1 s first), from another process, as slurmstepd
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        subprocess.run(["kill", "-USR1", str(pid)], check=True)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def _parent(proc) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
