"""The DALI backend on CPU: real JPEGs through real DALI pipelines (the GPU graph differs in device strings only)."""

from __future__ import annotations

import csv
import importlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="the DALI extra is not installed: pip install -e .[dali]")

from datamodules import dali  # noqa: E402
from datamodules.demo import write_demo_dataset  # noqa: E402
from datamodules.folder import decode, find_classes, scan_split  # noqa: E402
from datamodules.loaders import LoaderSpec  # noqa: E402
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, val_transform  # noqa: E402
from tests.conftest import run_resnet, tiny_fit_args  # noqa: E402


def split(root: Path, name: str) -> list[tuple[str, int]]:
    classes = find_classes(root / "train")
    return scan_split(root / name, {c: i for i, c in enumerate(classes)})


def make_spec(samples: list[tuple[str, int]], **overrides) -> LoaderSpec:
    spec = LoaderSpec(
        samples=samples, rank=0, world_size=1, batch_size=8, num_workers=1, seed=0, crop_size=32, val_resize_size=36,
        scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, device=torch.device("cpu"),
    )
    return replace(spec, **overrides)


def to_255(images: torch.Tensor) -> torch.Tensor:
    """Undo the loader's normalisation: back to the 0-255 scale."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.double() * std.double() + mean.double()


def read_pass(loader: dali.DaliLoader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return images, labels


@pytest.mark.parametrize("crop, resize", [(64, 73), (224, 256)])  # 32 of 36: tests/test_backends.py
def test_val_centre_crops_match_torchvision(demo_root, crop, resize):
    samples = split(demo_root, "val")
    loader = dali.val_loader(make_spec(samples, crop_size=crop, val_resize_size=resize), device="cpu")
    images, labels = read_pass(loader)
    assert len(images) == len(loader) == 4  # 30 images in batches of 8, the last one partial
    x = torch.cat(images)
    assert x.shape == (30, 3, crop, crop) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)  # DALI's HWC seen as NCHW
    assert torch.cat(labels).tolist() == [label for _, label in samples]
    assert torch.cat(labels).dtype == torch.int64
    reference = torch.stack([val_transform(crop_size=crop, resize_size=resize)(decode(p)) for p, _ in samples])
    diff = (to_255(x) - reference.double()).abs()
    # Same decoder output and the same resized size and crop window; the two antialiased bilinear kernels round
    # apart. Measured (30 demo JPEGs, 96-256 px): mean 0.103 / 0.148 / 0.191 at 32/36, 64/73, 224/256, max 1.0.
    # A one-pixel shift of the window or a rounded (not truncated) longer side gives means of 2-17.
    assert diff.mean() < 0.25, diff.mean()
    assert diff.max() < 1.5, diff.max()


@pytest.fixture(scope="module")
def coordinate_jpeg(tmp_path_factory) -> str:
    """256 x 256 JPEG whose red value is the column and green the row: a crop's pixels tell its window."""
    y, x = np.mgrid[0:256, 0:256]
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("coords") / "coords.jpg"
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)  # 4:4:4: no chroma blur
    return str(path)


def crop_windows(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, mirrored) of each 32-px crop's source window, from slopes of the coordinate ramps."""
    x = to_255(images).numpy()
    inner = np.arange(4, 28)  # away from the borders, where the antialiasing filter is clamped
    slope_x = np.array([np.polyfit(inner, p, 1)[0] for p in x[:, 0].mean(1)[:, 4:28]])
    slope_y = np.array([np.polyfit(inner, p, 1)[0] for p in x[:, 1].mean(2)[:, 4:28]])
    return np.abs(slope_x) * 32, np.abs(slope_y) * 32, slope_x < 0


def test_train_crops_cover_the_configured_area_and_ratio_and_flip_half(coordinate_jpeg):
    spec = make_spec([(coordinate_jpeg, 3)] * 64, batch_size=16, scale=(0.25, 1.0))
    loader = dali.train_loader(spec, device="cpu")
    assert len(loader) == 4
    batches = []
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert labels.shape == (16,) and labels.dtype == torch.int64 and (labels == 3).all()
            batches.append(images)
    images = torch.cat(batches)
    assert len(images) == 256
    blue = to_255(images)[:, 2]  # constant 128 in the JPEG: checks the per-channel mean and std
    assert blue.min() > 126 and blue.max() < 130
    width, height, mirrored = crop_windows(images)
    area, ratio = width * height / 256**2, width / height
    # Measured (seed 0): area 0.250-0.988, ratio 0.750-1.330; the fit reads the window to ~0.5 px.
    assert 0.24 < area.min() < 0.3 and area.max() > 0.85 and area.max() < 1.01
    assert 0.73 < ratio.min() < 0.8 and 1.28 < ratio.max() < 4 / 3 + 0.02
    assert 0.35 < mirrored.mean() < 0.65  # 256 coin flips: measured 0.52
    unflipped = dali.train_loader(replace(spec, hflip=False), device="cpu")
    assert not crop_windows(torch.cat(read_pass(unflipped)[0]))[2].any()


class _Rank:
    """The trainer attributes a DataModule reads: `rank` of 2 on the CPU."""

    def __init__(self, rank: int):
        self.global_rank, self.world_size = rank, 2
        self.strategy = type("S", (), {"root_device": torch.device("cpu")})()


def _datamodule(root: str, rank: int, state: dict | None = None):
    from datamodules.imagenet import ImageNetDataModule

    dm = ImageNetDataModule(root, batch_size=16, num_workers=1, crop_size=32, val_resize_size=36, backend="dali",
                            dali={"device": "cpu"})
    dm.trainer = _Rank(rank)
    dm.setup("fit")
    if state:
        dm.load_state_dict(state)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    return dm, loader


def _rank_reads_and_checkpoints(rank: int, root: str, port: int, out: str) -> None:
    """One of two gloo ranks: 2 batches of epoch 1, a checkpoint's DataModule state (a collective, as in
    Trainer.save_checkpoint), then the rest of the epoch as the uninterrupted run reads it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dm, loader = _datamodule(root, rank)
    batches = iter(loader)
    [next(batches) for _ in range(2)]
    state = dm.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in batches]
    torch.save({"state": state, "rest": rest}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_resume_their_own_crops_from_rank_0s_checkpoint(demo_root, tmp_path):
    """Lightning writes rank 0's checkpoint only: every rank's DALI pipeline state must be in it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_reads_and_checkpoints, args=(str(demo_root), port, str(tmp_path)), nprocs=2)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    checkpoint = saved[0]["state"]  # what the file holds
    assert sorted(checkpoint["dali_pipelines"]) == [0, 1]
    assert checkpoint["train_position"] == {"epoch": 1, "samples": 32, "world_size": 2, "batch_size": 8, "repeats": 1}
    for rank in (0, 1):
        _, loader = _datamodule(str(demo_root), rank, checkpoint)
        rest = list(loader)
        uninterrupted = saved[rank]["rest"]
        assert len(rest) == len(uninterrupted) == 2  # 36 images a rank: 4 batches of 8
        assert all(torch.equal(y, y0) and torch.equal(x, x0) for (x, y), (x0, y0) in zip(rest, uninterrupted))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_without_cuda_names_the_setting(demo_root):
    with pytest.raises(ValueError, match="data.dali.device=gpu needs a CUDA GPU"):
        dali.val_loader(make_spec(split(demo_root, "val")), device="gpu")


def test_missing_dali_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what `import nvidia.dali` meets when absent
    monkeypatch.delitem(sys.modules, "datamodules.dali")
    with pytest.raises(ImportError, match=r"pip install -e \.\[dali\]"):
        importlib.import_module("datamodules.dali")


@pytest.fixture(scope="module")
def demo240(tmp_path_factory) -> Path:
    """The demo textures with 240 training images (40 a class) and the same 30 validation images count."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo240", train_per_class=40, val_per_class=5)


def test_fit_with_dali_learns_and_counts_every_val_image_after_the_sanity_check(demo240, tmp_path):
    run_dir = tmp_path / "run"
    # 48 px (at 32 px most stripes blur away), lr 0.1 at batch 16; batch 16 -> 2 val batches and a sanity check
    # of 1 leaves the first validation pass half read. 72 training images overfit at ~30%: hence 240.
    run_resnet(*tiny_fit_args(
        demo240, run_dir, "--data.backend", "dali", "--data.crop_size", "48", "--data.val_resize_size", "55",
        "--data.batch_size", "16", "--data.random_resized_crop_scale", "[0.5, 1.0]", "--model.lr_per_256", "1.6",
        "--trainer.max_epochs", "5", "--trainer.num_sanity_val_steps", "1",
    ))
    with open(run_dir / "logs/version_0/metrics.csv") as f:
        val = [row for row in csv.DictReader(f) if row.get("val/images")]
    assert [int(row["epoch"]) for row in val] == [0, 1, 2, 3, 4]
    assert [float(row["val/images"]) for row in val] == [30.0] * 5  # every image, every epoch
    assert [int(row["step"]) for row in val] == [14, 29, 44, 59, 74]  # 240 / 16 = 15 steps an epoch
    acc = [float(row["val/acc1"]) for row in val]
    # Measured: 16.7% after epoch 1, 46.7% after 5 (the torchvision backend: 20.0% -> 43.3%); chance is 16.7%.
    assert acc[-1] >= 0.3 and acc[-1] > acc[0], acc
