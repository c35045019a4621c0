"""The GPU data paths: DALI's nvJPEG pipeline (`data.dali.device: gpu`), FFCV's ToDevice transfer, and the batches each
of the three backends feeds a bf16-mixed, channels_last fit.

Every check is a helper run once per device. The `cpu` variants run everywhere (DALI's CPU pipeline, FFCV without
ToDevice, a CPU trainer) and show that the assertions pass on working loaders; the `gpu` variants carry the `gpu`
marker and are skipped without CUDA (tests/conftest.py). On a GPU machine:

    RESNET_GPU_TEST_REPORT=gpu_data.json .venv/bin/python -m pytest -m gpu tests/test_gpu_data.py -q

writes the measured numbers (crop differences, memory growth, fit curves) to gpu_data.json, also when an assertion
fails; they are printed too (`-s` shows them)."""

from __future__ import annotations

import csv
import gc
import json
import math
import os
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="the DALI extra is not installed: pip install -e .[dali]")
pytest.importorskip("ffcv", reason="the ffcv extra is not installed: pip install -e .[ffcv]")

from datamodules import dali, ffcv, ffcv_write  # noqa: E402
from datamodules.demo import write_demo_dataset  # noqa: E402
from datamodules.folder import decode, find_classes, scan_split  # noqa: E402
from datamodules.imagenet import ImageNetDataModule  # noqa: E402
from datamodules.loaders import LoaderSpec  # noqa: E402
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, val_transform  # noqa: E402
from tests.conftest import run_resnet, tiny_fit_args  # noqa: E402
from train.model import ImageNetClassifier  # noqa: E402

# FFCV 1.0.2 with numba 0.68: a collected loader's compiled functions raise KeyError in numba's finaliser ("Exception
# ignored"; see tests/test_ffcv.py); nothing fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DEVICES = [pytest.param("cpu"), pytest.param("gpu", marks=pytest.mark.gpu)]
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD  # the normalised range of each channel
MiB = 2**20
# Used memory may grow by at most this much between the end of pass 3 and of pass 20: a pipeline or its buffers kept
# per pass would add more (DALI's nvJPEG decoder alone pads 16 MiB of device memory per thread).
MEMORY_GROWTH_MIB = 64


def record(name: str, **values) -> None:
    """Print measured numbers and, when $RESNET_GPU_TEST_REPORT names a file, merge them into it (JSON, by test)."""
    print(f"{name}: {values}")
    path = os.environ.get("RESNET_GPU_TEST_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    if torch.cuda.is_available() and "environment" not in report:
        import nvidia.dali.backend

        report["environment"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "dali": nvidia.dali.__version__, "ffcv": version("ffcv"),
                                 "nvjpeg": nvidia.dali.backend.GetNvjpegVersion()}
    report[name] = values
    Path(path).write_text(json.dumps(report, indent=1, sort_keys=True))


def target(device: str) -> torch.device:
    """Where a loader of this variant must deliver batches: the current CUDA device (cuda:N, index given) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")


def split(root: Path, name: str) -> list[tuple[str, int]]:
    classes = find_classes(root / "train")
    return scan_split(root / name, {c: i for i, c in enumerate(classes)})


def loader_spec(samples: list[tuple[str, int]], device: str, **overrides) -> LoaderSpec:
    """What the DataModule hands a backend on one rank, for a model on `device`: batch 8, one thread, crop 32/36."""
    spec = LoaderSpec(samples=samples, rank=0, world_size=1, batch_size=8, num_workers=1, seed=0, crop_size=32,
                      val_resize_size=36, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, device=target(device))
    return replace(spec, **overrides)


def to_255(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back on the 0-255 scale (float64, CPU)."""
    return images.detach().cpu().double() * (255 * STD.double()) + 255 * MEAN.double()


def check_batch(images: torch.Tensor, labels: torch.Tensor, *, device: torch.device, size: int, dtype: torch.dtype,
                channels_last: bool = True, num_classes: int = 6) -> None:
    """The loader contract (LoaderSpec): images (N, 3, size, size) of `dtype` on `device`, channels_last in memory;
    labels int64 (N,) on the same device; pixels as uint8 sources give them, normalised once if float."""
    n = len(labels)
    assert images.device == device and labels.device == device, (images.device, labels.device, device)
    assert images.shape == (n, 3, size, size) and images.dtype == dtype, (images.shape, images.dtype)
    assert images.is_contiguous(memory_format=torch.channels_last) or not channels_last, images.stride()
    assert labels.dtype == torch.int64 and labels.shape == (n,), (labels.dtype, labels.shape)
    assert 0 <= int(labels.min()) and int(labels.max()) < num_classes, labels
    if images.is_floating_point():
        x = images.detach().float().cpu()
        assert ((x >= LOW - 1e-4) & (x <= HIGH + 1e-4)).all(), (x.amin((0, 2, 3)), x.amax((0, 2, 3)))
        pixels = to_255(images)
        # Normalised exactly once with IMAGENET_MEAN/STD on the 0-255 scale: uint8 values come back whole. Another
        # scale (0-1 vs 0-255), a second normalisation or other constants leave fractions or leave the range.
        assert (pixels - pixels.round()).abs().max() < 0.01, (pixels - pixels.round()).abs().max()
    else:
        pixels = images.cpu().double()
    # Demo textures: two colours >= 150 levels apart plus noise: a blank, constant or unwritten buffer fails this.
    assert pixels.flatten(1).std(1).min() > 5, pixels.flatten(1).std(1).min()


def read_pass(loader, device: torch.device, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass, each batch checked where it was delivered, then copied (FFCV reuses its buffers a few batches on)."""
    images, labels = [], []
    for x, y in loader:
        check_batch(x, y, device=device, size=size, dtype=dtype)
        images.append(x.to("cpu", copy=True))
        labels.append(y.to("cpu", copy=True))
    assert len(images) == len(loader)
    return torch.cat(images), torch.cat(labels)


def torchvision_crops(samples: list[tuple[str, int]], crop: int, resize: int) -> torch.Tensor:
    """The torchvision backend's validation crops (libjpeg-turbo decode, antialiased resize, centre crop), uint8."""
    transform = val_transform(crop_size=crop, resize_size=resize)
    return torch.stack([transform(decode(path)) for path, _ in samples])


def used_memory(device: str) -> dict[str, int]:
    """Bytes in use: the process's resident memory and, on a GPU, the whole device's (DALI and nvJPEG allocate
    outside torch's caching allocator, so torch.cuda.memory_allocated would not see them)."""
    gc.collect()
    used = {"rss": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    if device == "gpu":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used["device"] = total - free
    return used


def memory_growth_over_passes(loader, device: str, passes: int = 20, after: int = 3) -> dict[str, float]:
    """MiB of memory growth between the end of pass `after` and of pass `passes`. Even-numbered passes before the last
    stop after one batch, as Lightning's sanity check does, so that an abandoned pass's pipeline is released too."""
    for number in range(1, passes + 1):
        for i, batch in enumerate(loader):
            if number % 2 == 0 and number < passes:
                break
        del batch
        if number == after:
            before = used_memory(device)
    now = used_memory(device)
    return {key: (now[key] - before[key]) / MiB for key in now}


# DALI's validation crops against the torchvision backend's, in levels of 255: (mean, max) of |difference| bounds.
# cpu: libjpeg-turbo decodes for both; the two antialiased bilinear kernels round apart: measured mean 0.10-0.19,
#   max 1 (tests/test_dali.py).
# gpu: NOT YET MEASURED ON A GPU (this test records the numbers). nvJPEG's IDCT is not libjpeg-turbo's; its chroma
#   upsampling is made libjpeg-turbo's by jpeg_fancy_upsampling=True (datamodules/dali.py), and DALI's own tests allow a
#   mean of 1 level between its mixed and cpu decoders then. Stand-ins measured here with libjpeg-turbo on these 30
#   images: its fast IDCT moves the crops by a mean of 0.9-1.0, max 3-6; pixel-replicating chroma upsampling (nvJPEG's
#   default) by a mean of 1.1 / 4.2, max 17 / 102 at 32/36 and 224/256. The bound admits the first and, at 224/256,
#   rejects the second; a crop window one pixel off gives means of 2-17.
DALI_CROP_BOUNDS = {"cpu": (0.25, 1.5), "gpu": (1.5, 16.0)}


@pytest.mark.parametrize("crop, resize", [(32, 36), (224, 256)])
@pytest.mark.parametrize("device", DEVICES)
def test_dali_val_batches_follow_the_contract_and_match_torchvision_crops(demo_root, device, crop, resize, request):
    samples = split(demo_root, "val")
    loader = dali.val_loader(loader_spec(samples, device, crop_size=crop, val_resize_size=resize), device=device)
    images, labels = read_pass(loader, target(device), crop, torch.float32)
    assert labels.tolist() == [label for _, label in samples]  # every image once, in order, the last batch partial
    diff = (to_255(images) - torchvision_crops(samples, crop, resize).double()).abs()
    record(request.node.name, mean_diff_255=round(diff.mean().item(), 4), max_diff_255=diff.max().item())
    mean_bound, max_bound = DALI_CROP_BOUNDS[device]
    assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean(), diff.max())


@pytest.mark.parametrize("device", DEVICES)
def test_dali_memory_stays_flat_over_20_pipeline_rebuilds(demo_root, device, request):
    # One pipeline per pass (datamodules/dali.py): 20 passes build 20, and their decoders' buffers must be freed.
    loader = dali.val_loader(loader_spec(split(demo_root, "val"), device, crop_size=64, val_resize_size=73),
                             device=device)
    growth = memory_growth_over_passes(loader, device)
    record(request.node.name, **{f"{key}_growth_mib": round(value, 2) for key, value in growth.items()})
    assert all(value <= MEMORY_GROWTH_MIB for value in growth.values()), growth


@pytest.fixture(scope="module")
def ffcv_dir(demo_root, tmp_path_factory) -> Path:
    """Raw (uncompressed) train.beton and val.beton of the small demo set: stored pixels are the sources' exactly."""
    return ffcv_write.prepare_ffcv(str(demo_root), str(tmp_path_factory.mktemp("ffcv")), compress_probability=0, workers=2)


@pytest.fixture(scope="module")
def ffcv_val_loader(demo_root, ffcv_dir):
    """One validation loader per device for the module: each new FFCV loader compiles its pipeline anew (seconds)."""
    loaders = {}

    def get(device: str) -> ffcv.EpochLoader:
        if device not in loaders:
            loaders[device] = ffcv.val_loader(loader_spec(split(demo_root, "val"), device), ffcv_dir / "val.beton")
        return loaders[device]

    yield get
    loaders.clear()
    gc.collect()


@pytest.mark.parametrize("device", DEVICES)
def test_ffcv_val_batches_follow_the_contract_and_equal_torchvision_crops(demo_root, ffcv_val_loader, device):
    samples = split(demo_root, "val")
    for _ in range(2):  # a second pass reuses the first one's buffers (and, with ToDevice, its CUDA streams)
        images, labels = read_pass(ffcv_val_loader(device), target(device), 32, torch.uint8)
        assert labels.tolist() == [label for _, label in samples]
        # Raw storage and torchvision's geometry (CenterCropDecoder): identical on the CPU; ToDevice only copies, so
        # any difference on the GPU is a copy read before it finished or a buffer overwritten while in use.
        assert torch.equal(images, torchvision_crops(samples, 32, 36))


@pytest.mark.parametrize("device", DEVICES)
def test_ffcv_memory_stays_flat_over_20_passes(ffcv_val_loader, device, request):
    # Each pass allocates its own pinned host and (ToDevice) device buffers and streams: freed with the pass.
    growth = memory_growth_over_passes(ffcv_val_loader(device), device)
    record(request.node.name, **{f"{key}_growth_mib": round(value, 2) for key, value in growth.items()})
    assert all(value <= MEMORY_GROWTH_MIB for value in growth.values()), growth


class RecordingDataModule(ImageNetDataModule):
    """The real DataModule that also keeps each training batch as its loader delivered it (after Lightning's transfer
    to the device, before the normalisation of uint8 batches)."""

    delivered: list

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer.training:
            self.delivered.append(tuple(t.clone() for t in batch))  # clone keeps the memory format
        return super().on_after_batch_transfer(batch, dataloader_idx)


class ModelInputs(pl.Callback):
    """What training_step receives, and what the network's first convolution receives and returns inside it (kept
    during the fit: Lightning moves the model back to the CPU at its end)."""

    def __init__(self):
        self.steps, self.conv1, self.device = [], [], None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device = pl_module.device

        def inputs(module, args):
            self.conv1.append({
                "input": args[0].detach().clone(), "autocast": torch.is_autocast_enabled(self.device.type),
                "weight_channels_last": module.weight.is_contiguous(memory_format=torch.channels_last),
            })

        def outputs(module, args, output):
            self.conv1[-1]["output_dtype"] = output.dtype

        pl_module.net.conv1.register_forward_pre_hook(inputs)
        pl_module.net.conv1.register_forward_hook(outputs)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.steps.append(tuple(t.clone() for t in batch))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_fit_feeds_the_model_normalised_channels_last_float_batches(demo_root, ffcv_dir, backend, device, tmp_path):
    data = RecordingDataModule(root=str(demo_root), batch_size=8, num_workers=0, crop_size=32, val_resize_size=36,
                               backend=backend, ffcv={"dir": str(ffcv_dir)})  # dali.device auto: gpu with a gpu trainer
    data.delivered = []
    model = ImageNetClassifier(arch="resnet18", num_classes=6, channels_last=True, batch_size=8)
    seen = ModelInputs()
    trainer = pl.Trainer(
        accelerator=device, devices=1, precision="bf16-mixed", max_epochs=1, max_steps=2, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[seen], default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    where = seen.device
    assert where == target(device) and len(data.delivered) == len(seen.steps) == len(seen.conv1) == 2
    for (loader_images, loader_labels), (images, labels), conv1 in zip(data.delivered, seen.steps, seen.conv1):
        # As the loader delivered it: uint8 from torchvision (a plain NCHW stack) and FFCV, normalised float32 (DALI).
        check_batch(loader_images, loader_labels, device=where, size=32, channels_last=backend != "torchvision",
                    dtype=torch.float32 if backend == "dali" else torch.uint8)
        # What training_step gets: float32, normalised once, on the model's device, whatever the backend.
        check_batch(images, labels, device=where, size=32, dtype=torch.float32, channels_last=backend != "torchvision")
        delivered = to_255(loader_images) if loader_images.is_floating_point() else loader_images.cpu().double()
        assert torch.equal(to_255(images).round(), delivered.round())  # the same pixels
        # What the network's first convolution gets: the same values, channels_last (forward converts), float32 under
        # bf16 autocast, which computes the convolution in bfloat16.
        assert conv1["input"].is_contiguous(memory_format=torch.channels_last), conv1["input"].stride()
        assert conv1["input"].dtype == torch.float32 and conv1["input"].device == where
        assert torch.equal(conv1["input"], images)
        assert conv1["autocast"] and conv1["output_dtype"] == torch.bfloat16, conv1
        assert conv1["weight_channels_last"]  # the model was converted too (model.channels_last)


@pytest.fixture(scope="module")
def demo240(tmp_path_factory) -> Path:
    """tests/test_dali.py's learnable set: 240 training images (40 a class), the same 30 validation images."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo240", train_per_class=40, val_per_class=5)


GPU_FIT = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
           "--model.channels_last", "true"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_short_gpu_fit_learns_and_counts_every_val_image(demo240, backend, tmp_path, request):
    # The runs of tests/test_dali.py's and tests/test_ffcv.py's fit tests (their CPU variants: 2-3 minutes each on 2
    # cores, too slow to repeat here), on the GPU: nvJPEG + GPU augmentation, or FFCV with ToDevice. The sanity check
    # leaves a validation pass half read, as on the CPU.
    if backend == "ffcv":
        ffcv_write.prepare_ffcv(str(demo240), compress_probability=0.5)  # <root>/ffcv, the DataModule's default
    run_dir = tmp_path / "run"
    extra = ["--data.dali.device", "gpu"] if backend == "dali" else ["--data.num_workers", "1"]
    run_resnet(*tiny_fit_args(
        demo240, run_dir, "--data.backend", backend, *extra, *GPU_FIT, "--data.crop_size", "48",
        "--data.val_resize_size", "55", "--data.batch_size", "16", "--data.random_resized_crop_scale", "[0.5, 1.0]",
        "--model.lr_per_256", "1.6", "--trainer.max_epochs", "6", "--trainer.num_sanity_val_steps", "1",
    ), timeout=600)
    with open(run_dir / "logs/version_0/metrics.csv") as f:
        val = [row for row in csv.DictReader(f) if row.get("val/images")]
    acc, loss = [float(row["val/acc1"]) for row in val], [float(row["val/loss"]) for row in val]
    record(request.node.name, val_acc1=acc, val_loss=loss)
    assert [float(row["val/images"]) for row in val] == [30.0] * 6  # every image, every epoch
    # On the CPU (fp32): top-1 0.17-0.27 after the first epoch, 0.40-0.60 in the last two, loss 1.0-1.4 at the end;
    # chance is 1/6 and ln 6 = 1.79.
    assert max(acc[-2:]) > max(acc[0], 1 / 3) and loss[-1] < min(loss[0], math.log(6)), (acc, loss)
