"""The loader contract, the same for every backend (torchvision, DALI, FFCV) through ImageNetDataModule: each rank's
validation shard holds every image once (strided, none padded) in as many batches as the other ranks', each crop as
one process reads it; the training shards of an epoch are disjoint, of equal steps, and reshuffled each epoch."""

from __future__ import annotations

import shutil

import pytest
import torch

from datamodules.backends import BACKENDS as REGISTRY
from datamodules.imagenet import ImageNetDataModule
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

BACKENDS = list(REGISTRY)  # every registered backend: a new one is held to the contract without a line here


class _Rank:
    """The trainer attributes a DataModule reads: `rank` of `world` on the CPU."""

    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size = rank, world
        self.strategy = type("S", (), {"root_device": torch.device("cpu")})()
        self.default_root_dir = None


@pytest.fixture(scope="module")
def data(demo_root, tmp_path_factory):
    """The small demo set (72 train / 30 val images) with its .beton files (raw storage) beside it."""
    root = tmp_path_factory.mktemp("contract") / "imagenet"
    shutil.copytree(demo_root, root)
    try:
        from datamodules.ffcv_write import prepare_ffcv

        prepare_ffcv(str(root), compress_probability=0.0, workers=1)
    except ImportError:
        pass  # the ffcv extra is absent: its cases skip
    return root


def datamodule(backend: str, root, rank: int = 0, world: int = 1, batch_size: int = 4) -> ImageNetDataModule:
    if REGISTRY[backend].requires:  # an optional extra: skipped without it
        pytest.importorskip(REGISTRY[backend].requires)
    dm = ImageNetDataModule(str(root), batch_size=batch_size * world, num_workers=1, crop_size=32, val_resize_size=36,
                            backend=backend, dali={"device": "cpu"})
    dm.trainer = _Rank(rank, world)
    dm.setup("fit")
    return dm


def read(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [(x.clone(), y.clone()) for x, y in loader]  # copies: FFCV reuses a batch's memory
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_shards_hold_each_image_once_in_equal_batch_counts(backend, data, world):
    # 30 images: 15 a rank on 2 (not a multiple of batch 4), 8/8/7/7 on 4 (not a multiple of the world).
    whole_images, whole_labels = read(datamodule(backend, data).val_dataloader())
    assert len(whole_labels) == 30
    loaders = [datamodule(backend, data, rank, world).val_dataloader() for rank in range(world)]
    assert len({len(loader) for loader in loaders}) == 1  # DDP needs the same number of batches on every rank
    for rank, loader in enumerate(loaders):
        it = iter(loader)  # Lightning's sanity check reads a batch and drops the pass
        next(it)
        del it
        images, labels = read(loader)
        assert labels.tolist() == whole_labels[rank::world].tolist()  # strided: rank, rank + world, ...
        assert torch.equal(images, whole_images[rank::world])  # the same crop as one process reads


def set_epoch(loader, epoch: int) -> None:
    """Where Lightning calls `set_epoch` before each epoch: the loader's sampler or its batch sampler's."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_shards_are_disjoint_equal_and_reshuffled_each_epoch(backend, data):
    # 72 images, 2 ranks x batch 4: 9 steps an epoch on each rank. Labels cannot tell images apart: the indices come
    # from the DataModule's EpochOrder, and the labels each backend delivers must be theirs.
    dms = [datamodule(backend, data, rank, 2) for rank in (0, 1)]
    loaders = [dm.train_dataloader() for dm in dms]
    assert [len(loader) for loader in loaders] == [9, 9]
    orders, labels = {}, {}
    for epoch in (0, 1):
        for rank, (dm, loader) in enumerate(zip(dms, loaders)):
            set_epoch(loader, epoch)
            images, labels[rank, epoch] = read(loader)
            assert images.shape == (36, 3, 32, 32)
            orders[rank, epoch] = dm.train_order.indices(epoch).tolist()
            assert labels[rank, epoch].tolist() == [dm.train_set.samples[i][1] for i in orders[rank, epoch]]
        assert not set(orders[0, epoch]) & set(orders[1, epoch])
        assert len(set(orders[0, epoch]) | set(orders[1, epoch])) == 72
    assert orders[0, 0] != orders[0, 1] and orders[1, 0] != orders[1, 1]
    # torchvision's DistributedSampler order (seed 0), the same images in the same batches on each rank.
    reference = torch.utils.data.DistributedSampler(range(72), 2, 1, shuffle=True, seed=0)
    reference.set_epoch(1)
    assert orders[1, 1] == list(reference)
    # A restart: Lightning creates the iterator, then sets the epoch; the pass is the epoch's, seeded.
    again = datamodule(backend, data, 1, 2).train_dataloader()
    batches = iter(again)
    set_epoch(again, 1)
    assert torch.cat([y.clone() for _, y in batches]).tolist() == labels[1, 1].tolist()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torchvision"])
def test_validation_crops_and_labels_are_the_torchvision_backends(backend, data):
    reference, labels = read(datamodule("torchvision", data).val_dataloader())
    assert reference.dtype == torch.uint8 and reference.shape == (30, 3, 32, 32)
    images, backend_labels = read(datamodule(backend, data).val_dataloader())
    assert backend_labels.tolist() == labels.tolist() and backend_labels.dtype == torch.int64
    assert images.shape == (30, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    if backend == "ffcv":  # uint8 like torchvision's (normalised on the device); raw storage: the same pixels
        assert images.dtype == torch.uint8 and torch.equal(images, reference)
    else:  # DALI hands out float, already normalised: back to 0-255. Its antialiased resize rounds apart
        # (measured on the demo JPEGs: mean 0.10, max 1.0 of 255; a one-pixel shift of the window gives 2-17).
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        diff = (images.double() * std.double() + mean.double() - reference.double()).abs()
        assert images.dtype == torch.float32 and diff.mean() < 0.25 and diff.max() < 1.5, (diff.mean(), diff.max())
