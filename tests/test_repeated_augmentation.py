"""Repeated augmentation (torchvision's --ra-sampler / --ra-reps, its V2 recipe's 4): the epoch's sequence against
torchvision's RASampler restated, copies on consecutive ranks with crops of their own, resumes mid-epoch, every
backend reading the repeated order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from datamodules.folder import find_classes, sample_seed, scan_split
from datamodules.imagenet import ImageNetDataModule
from datamodules.loaders import LoaderSpec
from datamodules.order import EpochOrder, TrainPosition, rank_order
from tests.conftest import REPO, run_resnet, tiny_fit_args


def ra_sampler(num_samples: int, rank: int, world_size: int, seed: int, epoch: int, repetitions: int) -> list[int]:
    """torchvision references/classification/sampler.py RASampler.__iter__, restated, without its last cut (each
    rank keeps the first `num_samples // 256 * 256 / world_size`: none of a set smaller than 256)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(num_samples, generator=g).tolist()
    per_rank = int(math.ceil(num_samples * float(repetitions) / world_size))
    indices = [i for i in indices for _ in range(repetitions)]
    indices += indices[: per_rank * world_size - len(indices)]
    return indices[rank : per_rank * world_size : world_size]


@pytest.mark.parametrize("num_samples, world, repeats", [(50, 1, 3), (50, 4, 4), (37, 8, 3), (24, 2, 1)])
def test_each_ranks_order_is_torchvisions_ra_sampler(num_samples, world, repeats):
    for rank in range(world):
        ours = rank_order(num_samples, 7, 3, rank, world, repeats=repeats)
        assert len(ours) == math.ceil(num_samples / world)  # an epoch keeps its number of samples (and steps)
        assert ours.tolist() == ra_sampler(num_samples, rank, world, 7, 3, repeats)[: len(ours)]


def test_copies_go_to_consecutive_ranks_each_with_its_own_crop_seed():
    # 4 ranks, 4 copies: at every step the ranks hold the same images, each rank its own copy of them.
    orders = [EpochOrder(24, seed=0, rank=r, world_size=4, batch_size=2, repeats=4) for r in range(4)]
    keys = [list(order.batches(order.begin_pass())) for order in orders]
    assert [len(k) for k in keys] == [3] * 4  # 24 / 4 ranks / batch 2: the steps of an epoch without repeats
    seen = []
    for step in range(3):
        for slot in range(2):
            at_step = [keys[r][step][slot] for r in range(4)]
            assert len({(index, epoch) for index, epoch, _ in at_step}) == 1, at_step  # one image
            assert sorted(copy for _, _, copy in at_step) == [0, 1, 2, 3], at_step  # four copies
            seen.append(at_step[0][0])
    assert len(set(seen)) == 6  # 24 samples an epoch: 6 distinct images, each 4 times
    assert len({sample_seed(0, 0, seen[0], copy) for copy in range(4)}) == 4
    assert sample_seed(0, 0, seen[0], 0) == sample_seed(0, 0, seen[0])  # copy 0: the seed without repeats


@pytest.mark.parametrize("world", [1, 3])
def test_a_resume_mid_epoch_continues_with_the_same_copies(world):
    for rank in range(world):
        whole = EpochOrder(40, seed=1, rank=rank, world_size=world, batch_size=2, repeats=3)
        whole.set_epoch(2)
        indices, copies = whole.keys(2)
        resumed = EpochOrder(40, seed=1, rank=rank, world_size=world, batch_size=2, repeats=3)
        resumed.set_epoch(2)
        resumed.resume_at(TrainPosition(epoch=2, samples=2 * 2 * world, world_size=world, batch_size=2, repeats=3))
        keys = [k for batch in resumed.batches(resumed.begin_pass()) for k in batch]
        assert keys == [(int(i), 2, int(c)) for i, c in zip(indices[4:], copies[4:])]


def test_bad_value_is_a_usage_error_naming_the_setting(demo_root, tmp_path):
    proc = run_resnet(*tiny_fit_args(demo_root, tmp_path / "run", "--data.repeated_augmentation", "0"), expect_rc=2)
    assert "error: data.repeated_augmentation=0: copies of each image in an epoch, at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_torchvision_backend_batches_hold_each_image_twice_in_two_crops(demo_root):
    dm = ImageNetDataModule(str(demo_root), batch_size=4, num_workers=0, crop_size=32, repeated_augmentation=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 72 // 4  # the steps of an epoch without repeats
    batches = list(loader)
    for images, labels in batches:
        assert labels[0] == labels[1] and labels[2] == labels[3]  # one rank: the two copies in a row
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[2], images[3])
    _, counts = np.unique(dm.train_order.indices(0), return_counts=True)
    assert len(counts) == 36 and set(counts) == {2}  # 72 samples an epoch: 36 images, twice each
    again = list(dm.train_dataloader())  # the same copies, the same crops: a function of (seed, epoch, index, copy)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_other_backends_read_the_repeated_order(backend, demo_root, tmp_path):
    classes = find_classes(demo_root / "train")
    samples = scan_split(demo_root / "train", {c: i for i, c in enumerate(classes)})
    order = EpochOrder(len(samples), seed=0, rank=0, world_size=1, batch_size=4, repeats=2)
    spec = LoaderSpec(samples=samples, rank=0, world_size=1, batch_size=4, num_workers=1, seed=0, crop_size=32,
                      val_resize_size=36, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
                      device=torch.device("cpu"), order=order)
    if backend == "dali":
        loader = pytest.importorskip("datamodules.dali").train_loader(spec, device="cpu")
    else:
        pytest.importorskip("ffcv")
        from datamodules import ffcv
        from datamodules.ffcv_write import prepare_ffcv

        betons = prepare_ffcv(str(demo_root), str(tmp_path / "ffcv"), compress_probability=0.0, splits=["train"], workers=1)
        loader = ffcv.train_loader(spec, betons / "train.beton")
    loader.sampler.set_epoch(1)
    labels = torch.cat([y.clone() for _, y in loader])
    expected = np.array([samples[i][1] for i in order.indices(1)])
    assert labels.tolist() == expected.tolist() and len(labels) == 72
    assert (labels[0::2] == labels[1::2]).all()  # each image twice in a row


def test_torchvision_v2_recipe_repeats_four_times():
    recipe = yaml.safe_load((REPO / "configs/recipes/torchvision_v2.yaml").read_text())
    assert recipe["data"]["repeated_augmentation"] == 4  # --ra-sampler --ra-reps 4


def test_a_resume_with_another_world_or_repeat_count_reads_the_rest_once(caplog):
    # Saved after 2 steps of 2 ranks x batch 2 with 3 copies: 8 positions read of 40.
    saved = TrainPosition(epoch=0, samples=8, world_size=2, batch_size=2, repeats=3)
    assert TrainPosition.from_dict(saved.as_dict()) == saved
    assert TrainPosition.from_dict({"epoch": 0, "samples": 8, "world_size": 2, "batch_size": 2}).repeats == 1  # older
    for world, repeats in ((4, 3), (2, 2)):
        orders = [EpochOrder(40, seed=1, rank=r, world_size=world, batch_size=2, repeats=repeats) for r in range(world)]
        read = []
        for order in orders:
            order.resume_at(saved)
            indices = order.begin_pass()
            read += [(int(i), int(c)) for i, c in zip(indices, order._pass_repeats)]
        # The positions 8..39 of the resumed run's sequence, each once (whole batches: at most a batch a rank short).
        whole = EpochOrder(40, seed=1, rank=0, world_size=1, batch_size=1, repeats=repeats).keys(0)
        rest = sorted(zip(whole[0][8:].tolist(), whole[1][8:].tolist()))
        assert len(read) == len(set(read)) and set(read) <= set(rest) and len(rest) - len(read) < world * 2
    assert "with data.repeated_augmentation=2 (saved with 3): the rest of the epoch is dealt out anew" in caplog.text


def test_ffcvs_page_local_order_refuses_repeats(tmp_path):
    with pytest.raises(ValueError, match="data.repeated_augmentation=4 with data.ffcv.order=quasi_random"):
        ImageNetDataModule(str(tmp_path), backend="ffcv", ffcv={"order": "quasi_random"}, repeated_augmentation=4)
