"""The recipe building blocks against their sources: FFCV's progressive resizing rule and its effect on the batch
size in every backend, the validation crop, TrivialAugment and RandomErasing; the recipes in configs/recipes/."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from datamodules.folder import find_classes, scan_split
from datamodules.imagenet import ImageNetDataModule
from datamodules.loaders import LoaderSpec
from datamodules.transforms import IMAGENET_MEAN, ProgressiveResizing, train_transform
from tests.conftest import REPO, run_resnet
from train.callbacks import ValidationEpochs
from train.cli import build_cli
from train.networks import BlurPoolConv2d
from train.weights import load_checkpoint
from train.optim import lr_factor, scaled_lr


def ffcv_get_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """ffcv-imagenet's train_imagenet.py, restated."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


# rn50_configs/rn50_{epochs}_epochs.yaml: (start_ramp, end_ramp); min_res 160, max_res 192 in all.
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


@pytest.mark.parametrize("epochs", FFCV_RAMPS)
def test_progressive_resizing_is_ffcvs_rule(epochs):
    start, end = FFCV_RAMPS[epochs]
    schedule = ProgressiveResizing(160, 192, start, end)
    assert [schedule.at(e) for e in range(epochs)] == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)]
    with pytest.raises(ValueError, match="min_size <= max_size"):
        ProgressiveResizing(192, 160, 0, 1)


def demo_samples(root, split: str) -> list[tuple[str, int]]:
    classes = find_classes(root / "train")
    return scan_split(root / split, {c: i for i, c in enumerate(classes)})


RESIZING = ProgressiveResizing(min_size=32, max_size=96, start_epoch=1, end_epoch=3)  # 32, 32, 64, 96


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_progressive_resizing_sets_each_epochs_batch_size_in_every_backend(backend, demo_root, tmp_path):
    spec = LoaderSpec(samples=demo_samples(demo_root, "train"), rank=0, world_size=1, batch_size=4, num_workers=1,
                      seed=0, crop_size=32, val_resize_size=36, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
                      device=torch.device("cpu"), resizing=RESIZING)
    if backend == "torchvision":
        dm = ImageNetDataModule(str(demo_root), batch_size=4, num_workers=0, crop_size=32, progressive_resizing=RESIZING)
        dm.setup("fit")
        loader = dm.train_dataloader()
        set_epoch = loader.batch_sampler.sampler.set_epoch  # where Lightning calls it
    elif backend == "dali":
        dali = pytest.importorskip("datamodules.dali")
        loader = dali.train_loader(spec, device="cpu")
        set_epoch = loader.sampler.set_epoch
    else:
        pytest.importorskip("ffcv")
        from datamodules import ffcv
        from datamodules.ffcv_write import prepare_ffcv

        betons = prepare_ffcv(str(demo_root), str(tmp_path / "ffcv"), compress_probability=0.0, splits=["train"], workers=1)
        loader = ffcv.train_loader(spec, betons / "train.beton")
        set_epoch = loader.sampler.set_epoch
    sides = {}
    for epoch in (0, 2, 3, 1):  # out of order, as after a resume
        set_epoch(epoch)
        # Two batches of each pass, the rest left unread, as `limit_train_batches` or a stop mid-epoch leaves it: with
        # FFCV's `recompile`, each pass compiled the pipeline anew in its thread, and one such pass never ended in a
        # fresh-clone run under xdist (2026-12-07).
        passes = iter(loader)
        shapes = {tuple(next(passes)[0].shape[-2:]) for _ in range(2)}
        assert len(shapes) == 1, shapes
        sides[epoch] = shapes.pop()
    assert sides == {0: (32, 32), 1: (32, 32), 2: (64, 64), 3: (96, 96)}


def test_validation_crop_apart_from_the_training_crop(demo_root):
    dm = ImageNetDataModule(str(demo_root), batch_size=4, num_workers=0, crop_size=32, val_resize_size=58,
                            val_crop_size=48)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape[-2:] == (32, 32)
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (48, 48)
    with pytest.raises(ValueError, match="data.trivial_augment=True .* torchvision backend only"):
        ImageNetDataModule(str(demo_root), batch_size=4, backend="dali", trivial_augment=True)  # before any reading


def test_trivial_augment_and_random_erasing_in_the_training_transform():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    ops = [type(t).__name__ for t in train_transform(crop_size=32, trivial_augment=True, random_erasing=0.1).transforms]
    assert ops == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "RandomErasing"]
    torch.manual_seed(0)
    erased = train_transform(crop_size=32, scale=(1.0, 1.0), hflip=False, random_erasing=1.0)(image)
    mean = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8).view(3, 1, 1)
    box = (erased == mean).all(dim=0)  # the erased pixels hold the mean colour: 0 after normalisation
    assert erased.dtype == torch.uint8 and 0.02 * 32 * 32 <= box.sum() <= 0.33 * 32 * 32 + 32


RECIPES = sorted(p.stem for p in (REPO / "configs/recipes").glob("*.yaml"))


def recipe_cli(name: str, *extra: str):
    return build_cli(["--config", str(REPO / "configs/imagenet_r50.yaml"), "--config",
                      str(REPO / f"configs/recipes/{name}.yaml"), *extra], run=False)


def lr_at(cli, epoch: float, steps_per_epoch: int = 1000) -> float:
    """The recipe's lr at the start of `epoch` (a fraction allowed), from the module's own schedule settings."""
    h = cli.model.hparams
    base = scaled_lr(h.lr_per_256, h.batch_size)
    return base * lr_factor(round(epoch * steps_per_epoch), steps_per_epoch=steps_per_epoch,
                            total_steps=cli.trainer.max_epochs * steps_per_epoch, schedule=h.lr_schedule,
                            milestones=h.lr_milestones, gamma=h.lr_gamma, warmup_epochs=h.warmup_epochs,
                            warmup_start_factor=h.warmup_start_factor, end_factor=h.lr_end_factor, power=h.lr_poly_power)


# (recipe, epoch) -> the published lr there; then the recipe's training crop side at named epochs.
PUBLISHED_LR = {
    ("paper", 0): 0.1, ("paper", 29.9): 0.1, ("paper", 30): 0.01, ("paper", 60): 0.001, ("paper", 90): 1e-4,
    ("torchvision_v1", 29): 0.1, ("torchvision_v1", 30): 0.01, ("torchvision_v1", 60): 0.001,
    ("torchvision_v1", 89): 0.001,  # no third drop at 80
    ("goyal", 0): 0.1, ("goyal", 2.5): 0.25, ("goyal", 5): 0.4, ("goyal", 30): 0.04, ("goyal", 80): 0.0004,
    ("ffcv_rn50_16", 0): 1.7e-4, ("ffcv_rn50_16", 1): (1.7e-4 + 1.7) / 2, ("ffcv_rn50_16", 2): 1.7,
    ("ffcv_rn50_16", 9): 1.7 * 7 / 14, ("ffcv_rn50_16", 16): 0.0,
    ("ffcv_rn50_88", 2): 1.7, ("ffcv_rn50_88", 45): 1.7 * 43 / 86,
    ("mlperf_r50", 2): 10.5, ("mlperf_r50", 19.5): (10.5 - 1e-4) * 0.5**2 + 1e-4, ("mlperf_r50", 37): 1e-4,
    ("torchvision_v2", 0): 0.005, ("torchvision_v2", 5): 0.5, ("torchvision_v2", 302.5): 0.25,
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_to_the_published_numbers(name):
    cli = recipe_cli(name)
    for (recipe, epoch), lr in PUBLISHED_LR.items():
        if recipe == name:  # exact, but one step (of 1,000 an epoch) ahead during warmup: train/optim.py
            h = cli.model.hparams
            tolerance = scaled_lr(h.lr_per_256, h.batch_size) / 1000 if epoch < h.warmup_epochs else 1e-9
            assert lr_at(cli, epoch) == pytest.approx(lr, rel=1e-6, abs=tolerance), (epoch, lr)
    dm, h = cli.datamodule, cli.model.hparams
    if name.startswith("ffcv_rn50_"):
        epochs = int(name.split("_")[-1])
        start, end = FFCV_RAMPS[epochs]
        sizes = [dm._resizing().at(e) for e in range(epochs)]
        assert sizes == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)]
        assert (dm.hparams.val_crop_size, h.blurpool, h.val_flip_average, h.label_smoothing) == (256, True, True, 0.1)
    if name == "torchvision_v2":
        (ema,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
        # After the 5 warmup epochs of 1,251 steps (torchvision resets its EMA during warmup), every 32nd step.
        assert not any(ema.should_update(step_idx=i) for i in (0, 32, 6240)) and not ema.should_update(epoch_idx=5)
        assert ema.should_update(step_idx=6272) and not ema.should_update(step_idx=6273)
        decay = 1 - (1 - 0.99998) * 1024 * 32 / 600  # torchvision's adjustment for its batch and epochs
        assert cli.config.trainer.callbacks[0].init_args.decay == pytest.approx(decay, abs=1e-6)
        assert (dm.hparams.crop_size, dm.hparams.val_resize_size, dm.hparams.val_crop_size) == (176, 232, 224)
        assert (h.mixup_alpha, h.cutmix_alpha, dm.hparams.trivial_augment, dm.hparams.random_erasing) == (0.2, 1.0, True, 0.1)
    if name == "mlperf_r50":
        (stop,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
        (schedule,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "ValidationEpochs"]
        assert stop.stopping_threshold == 0.759 and cli.trainer.max_epochs == 37
        assert [e for e in range(1, 38) if schedule.due(e, 37)] == [3, 7, 11, 15, 19, 23, 27, 31, 35, 37]
        assert (h.optimizer, dm.batch_size, h.weight_decay) == ("lars", 3264, 5e-5)


# Two training steps and a validation batch of each recipe on the demo data at the recipe's own sizes (ResNet-18,
# batch 4, CPU); the FFCV recipe in every backend. The others name the torchvision backend: TrivialAugment and
# RandomErasing (torchvision_v2) and scale jitter (paper) exist there only.
FITS = [(name, "torchvision") for name in RECIPES if not name.startswith("ffcv_rn50_")] + [
    ("ffcv_rn50_16", backend) for backend in ("torchvision", "dali", "ffcv")]


@pytest.fixture(scope="module")
def demo_betons(demo_root, tmp_path_factory):
    pytest.importorskip("ffcv")
    from datamodules.ffcv_write import prepare_ffcv

    return prepare_ffcv(str(demo_root), str(tmp_path_factory.mktemp("ffcv")), compress_probability=0.5, workers=1)


@pytest.mark.parametrize("name, backend", FITS)
def test_recipe_trains_two_steps(name, backend, demo_root, tmp_path, request):
    extra = ["--data.ffcv.dir", str(request.getfixturevalue("demo_betons"))] if backend == "ffcv" else []
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    steps = 2
    cli = recipe_cli(
        name, "--data.root", str(demo_root), "--data.backend", backend, "--data.batch_size", "4",
        "--data.num_workers", "1", "--model.arch", "resnet18", "--model.num_classes", "6", "--model.channels_last",
        "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), *extra)
    if name == "mlperf_r50":  # its first validation comes at epoch 3: validate this one
        next(c for c in cli.trainer.callbacks if type(c).__name__ == "ValidationEpochs").first = 1
    before = {k: v.clone() for k, v in cli.model.net.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == steps
    # The trained weights; with an EMA (torchvision_v2) Lightning leaves the average in the model at the end, and
    # the checkpoint keeps the trained ones apart.
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    trained = ckpt.get("current_model_state", ckpt["state_dict"])
    after = {k.removeprefix("net."): v for k, v in trained.items() if k.startswith("net.")}
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc1"]) <= 1.0
    # What the recipe switched on is what ran: optimizer, lr after the 2 steps, BlurPool (also in `resnet evaluate`'s
    # network built from the checkpoint), batch mixing.
    h, optimizer = cli.model.hparams, cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == {"sgd": "SGD", "lars": "Lars"}[h.optimizer]
    expected = scaled_lr(h.lr_per_256, 4) * lr_factor(
        steps, steps_per_epoch=steps, total_steps=steps, schedule=h.lr_schedule, milestones=h.lr_milestones, gamma=h.lr_gamma,
        warmup_epochs=h.warmup_epochs, warmup_start_factor=h.warmup_start_factor, end_factor=h.lr_end_factor,
        power=h.lr_poly_power)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    blurred = lambda net: sum(isinstance(m, BlurPoolConv2d) for m in net.modules())
    assert blurred(cli.model.net) == blurred(load_checkpoint(str(tmp_path / "checkpoints/last.ckpt")).net) == 6 * h.blurpool
    assert (cli.model.batch_mix is not None) == (h.mixup_alpha > 0 or h.cutmix_alpha > 0)


def test_ema_of_the_weights_is_the_exponential_average_of_each_step(demo_root, tmp_path):
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

    class Record(Callback):
        def __init__(self):
            self.weights = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.weights.append(pl_module.net.fc.weight.detach().clone())

    cli = build_cli(["--config", str(REPO / "configs/demo.yaml"), "--data.root", str(demo_root), "--data.crop_size",
                     "32", "--data.val_resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
                     "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    record, decay = Record(), 0.5
    cli.trainer.callbacks.extend([record, EMAWeightAveraging(decay=decay, update_every_n_steps=1)])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    average = record.weights[0]  # the first update copies the weights
    for w in record.weights[1:]:
        average = decay * average + (1 - decay) * w
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    # The checkpoint's weights (what validation and `resnet evaluate` use) are the average; the live ones kept apart.
    assert torch.allclose(checkpoint["state_dict"]["net.fc.weight"], average, atol=1e-6)
    assert torch.equal(checkpoint["current_model_state"]["net.fc.weight"], record.weights[-1])
    assert not torch.allclose(average, record.weights[-1])


def test_validation_epochs_validates_the_epochs_due_and_the_last(demo_root, tmp_path):
    cli = build_cli(["--config", str(REPO / "configs/demo.yaml"), "--data.root", str(demo_root), "--data.crop_size",
                     "32", "--data.val_resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
                     "--model.arch", "resnet18", "--trainer.max_epochs", "6", "--trainer.limit_train_batches", "1",
                     "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.callbacks+=train.callbacks.ValidationEpochs", "--trainer.callbacks.first", "2",
                     "--trainer.callbacks.every", "3"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    validated = [int(r["epoch"]) + 1 for r in csv.DictReader(open(tmp_path / "logs/version_0/metrics.csv")) if r.get("val/acc1")]
    assert validated == [2, 5, 6]  # 2, 2 + 3, and the last
    with pytest.raises(ValueError, match="expected both >= 1"):
        ValidationEpochs(first=0)
