"""`resnet bench ...`: throughput measurements behind docs/BENCHMARKS.md (scripts, not timed tests)."""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from rich.table import Table
from torchvision import datasets
from torchvision import transforms as v1

from datamodules.backends import BACKENDS, DaliOptions, FfcvOptions
from datamodules.demo import write_bench_dataset
from datamodules.imagenet import ImageNetDataModule
from datamodules.loaders import default_num_workers
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.networks import Arch, build_resnet
from train.results import console

Backend = Literal[("pil", *BACKENDS)]  # type: ignore[misc]  # pil: torchvision datasets.ImageFolder, the baseline


def device_name(accelerator: str = "auto") -> str:
    if torch.cuda.is_available() and accelerator != "cpu":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_batches(batches, warmup: int, count: int, on_batch=lambda b: b, stats: Optional[dict] = None) -> float:
    """Images/s over `count` batches after `warmup` ones, or as many as the loader has (decode and augmentation
    are lazy: pull and touch). `stats`, when given, gets what was timed: images, seconds and the last batch's
    image shape."""
    it = iter(batches)
    for _ in range(warmup):
        on_batch(next(it))
    images, start, shape = 0, time.perf_counter(), None
    for _ in range(count):
        try:
            batch = on_batch(next(it))
        except StopIteration:
            break
        images, shape = images + batch[0].shape[0], tuple(batch[0].shape)
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.update(images=images, seconds=seconds, shape=shape)
    return images / seconds


def _pil_imagefolder(root: str, crop_size: int, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """The classic path: torchvision.datasets.ImageFolder, PIL decode, v1 transforms to normalised float."""
    transform = v1.Compose([
        v1.RandomResizedCrop(crop_size), v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    ])
    dataset = datasets.ImageFolder(str(Path(root) / "train"), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       drop_last=True, persistent_workers=num_workers > 0)


FFCV_PREPARE_LIMIT_S = 1800  # ~10,000 generated JPEGs take well under a minute on 16 cores


def ensure_ffcv(root: str) -> Path:
    """`<root>/ffcv` holding train.beton and val.beton, written by `resnet prepare ffcv` when missing."""
    dst = Path(root) / "ffcv"
    if not all((dst / f"{split}.beton").is_file() for split in ("train", "val")):
        # In a fresh process, before any loader starts: FFCV's writer forks workers that compile with numba on
        # a first run, and such a fork deadlocked here in a process already running DALI and loader threads.
        # Bounded: a stuck writer (FFCV's DatasetWriter waits forever on a dead worker) must not stall a benchmark.
        subprocess.run([str(Path(sys.executable).parent / "resnet"), "prepare", "ffcv", "--root", str(root),
                        "--dst", str(dst)], check=True, timeout=FFCV_PREPARE_LIMIT_S)
    return dst


def loader_rate(
    root: str,
    backend: Backend,
    *,
    batch_size: int,
    num_workers: int,
    crop_size: int,
    warmup_batches: int,
    batches: int,
    ffcv_dir: Optional[str] = None,
    accelerator: Literal["cpu", "gpu"] = "cpu",
    stats: Optional[dict] = None,
) -> float:
    """Images/s of one backend's training loader alone (see bench_data); on `gpu` DALI decodes with nvJPEG
    (`data.dali.device gpu`, what training on a GPU uses) and every batch is copied to the GPU and normalised there.
    `stats`: filled as `time_batches` does."""
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")

    def on_device(batch):  # what Lightning's batch transfer does (pinned host batches: asynchronous copies)
        if device.type == "cuda":
            batch = [t.to(device, non_blocking=True) for t in batch]
            torch.cuda.synchronize(device)
        return batch

    if backend == "pil":
        loader = _pil_imagefolder(root, crop_size, batch_size, num_workers)
        return time_batches(loader, warmup_batches, batches, on_device, stats)
    dm = ImageNetDataModule(root, batch_size=batch_size, num_workers=num_workers, crop_size=crop_size,
                            backend=backend, ffcv=FfcvOptions(dir=ffcv_dir),
                            dali=DaliOptions(device="gpu" if device.type == "cuda" else "cpu"))
    if device.type == "cuda":  # the loaders' target device, as in training: FFCV then copies with its own ToDevice
        dm.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    dm.setup("fit")
    return time_batches(dm.train_dataloader(), warmup_batches, batches,
                         lambda b: dm.on_after_batch_transfer(on_device(b), 0), stats)


def bench_data(
    root: Optional[str] = None,
    backends: list[Backend] = ["pil", *BACKENDS],
    batch_size: int = 64,
    num_workers: int = 2,
    crop_size: int = 224,
    warmup_batches: int = 10,
    batches: int = 40,
    ffcv_dir: Optional[str] = None,
    accelerator: Literal["cpu", "gpu"] = "cpu",
) -> list[dict]:
    """Training-augmentation throughput of the loaders alone (RandomResizedCrop + flip + normalise, no model),
    each backend on the same JPEGs in one run; `pil` is the classic ImageFolder + PIL path, for reference.

    Args:
        root: ImageNet-layout folder; None = generated ImageNet-sized JPEGs (500x375, quality 90) under .cache/.
        backends: loaders to time, in order.
        batch_size: images per batch.
        num_workers: loader processes (torchvision, pil), threads (dali) or workers (ffcv).
        crop_size: training crop side.
        warmup_batches: batches pulled before timing (worker start-up; FFCV's numba JIT).
        batches: batches timed.
        ffcv_dir: folder with train.beton (`resnet prepare ffcv`); None = <root>/ffcv, written if missing.
        accelerator: `gpu`: each batch is copied to the GPU and normalised there, as in training (the copy
            and the normalisation are timed), and DALI decodes on the GPU; `cpu`: normalised in this process,
            DALI's CPU pipeline.

    Returns:
        One row per backend: backend, images_per_sec, images and seconds timed, shape (N, C, H, W) of a batch.
    """
    if root is None:
        root = str(write_bench_dataset((warmup_batches + batches + 1) * batch_size // 6 + 1, 1))
    if "ffcv" in backends and ffcv_dir is None:
        ensure_ffcv(root)
    rows = []
    for backend in backends:
        timed: dict = {}
        rate = loader_rate(root, backend, batch_size=batch_size, num_workers=num_workers, crop_size=crop_size,
                           warmup_batches=warmup_batches, batches=batches, ffcv_dir=ffcv_dir, accelerator=accelerator,
                           stats=timed)
        if timed["images"] < batches * batch_size:  # a set too small for the batches asked: say so in the row
            console().print(f"[{backend}] only {timed['images']} images after the warm-up, not {batches * batch_size}")
        rows.append({"backend": backend, "images_per_sec": rate, **timed})
    table = Table(title=f"Loader throughput: RandomResizedCrop {crop_size} + flip + normalise, batch {batch_size}, "
                        f"{num_workers} workers, {device_name(accelerator)}")
    table.add_column("backend")
    table.add_column("images/s", justify="right")
    table.add_column("vs pil", justify="right")
    pil = next((r["images_per_sec"] for r in rows if r["backend"] == "pil"), None)
    for r in rows:
        table.add_row(r["backend"], f"{r['images_per_sec']:.0f}", f"{r['images_per_sec'] / pil:.2f}x" if pil else "")
    console().print(table)
    return rows


def bench_model(
    arch: Arch = "resnet50",
    batch_size: int = 256,
    crop_size: int = 224,
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "bf16-mixed",
    channels_last: bool = True,
    steps: int = 20,
    warmup_steps: int = 5,
    accelerator: Literal["auto", "cpu", "gpu"] = "auto",
    compile: bool = False,
    cudnn_benchmark: bool = False,
    tf32: Optional[bool] = None,
    train: bool = True,
) -> float:
    """Training-step images/s on synthetic tensors already on the device: the model's ceiling, no loader.

    Args:
        arch: network depth.
        batch_size: images per step (one device).
        crop_size: image side.
        precision: `bf16-mixed`, `16-mixed` (GPU) or `32-true`.
        channels_last: NHWC memory format.
        steps: steps timed.
        warmup_steps: steps before timing (cuDNN autotuning, allocator).
        accelerator: `cpu`, `gpu` or `auto`.
        compile: torch.compile the network (as `--model.compile true`); compiling happens in the warm-up steps.
        cudnn_benchmark: torch.backends.cudnn.benchmark (cuDNN times its algorithms for each new shape; what
            `--trainer.benchmark true` sets); false is torch's and Lightning's default.
        tf32: TensorFloat-32 for float32 convolutions and matrix products on a GPU (only matters for 32-true);
            None = torch's defaults (cuDNN convolutions in TF32, matrix products in full float32).
        train: a training step (forward, backward, SGD); false = inference (eval mode, no gradients).
    """
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator != "cpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_resnet(arch).to(device, memory_format=fmt)
    if compile:
        net.compile()  # in place, as ImageNetClassifier does
    net.train(train)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch_size, 3, crop_size, crop_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        if not train:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                net(x)
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch_size / (time.perf_counter() - start)
    options = [precision, "channels_last" if channels_last else "NCHW"]
    options += ["compiled"] * compile
    if device.type == "cuda":
        options += ["cudnn.benchmark"] * cudnn_benchmark + ([] if tf32 is None else [f"tf32 {'on' if tf32 else 'off'}"])
    console().print(f"model ceiling ({'training step' if train else 'inference'}): {arch}, batch {batch_size}, {crop_size}px, "
                    f"{', '.join(options)}, {device_name(accelerator)}: {rate:.1f} images/s")
    return rate


class StepTimer(pl.Callback):
    """Images/s of the `steps` training steps after the first `warmup`, timed as bench_model times: one device
    sync when the window opens and one when it closes, none in between (a sync per step would drain the GPU's
    queue of kernels at every step, which a real run does not do)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start: Optional[float] = None
        self.rate: Optional[float] = None
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done, this batch's included
        if self.start is not None and self.rate is None:
            self.images += batch[0].shape[0]
        if (step == self.warmup and self.start is None) or (step == self.warmup + self.steps and self.rate is None):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            if self.start is None:
                self.start = time.perf_counter()
            else:
                self.rate = self.images / (time.perf_counter() - self.start)


def fit_cli(args: list[str]):
    """`resnet fit`'s command line (train.cli.build_cli) parsed from `args` and instantiated, not run."""
    from train.cli import build_cli  # the full recipe, parsed as `resnet fit` parses it
    from train.commands import read_renamed_keys, renamed_options, underscore_options

    read_renamed_keys()
    with warnings.catch_warnings():
        # LightningCLI warns when sys.argv holds arguments too: here they are `bench ...`, not meant for it.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return build_cli(renamed_options(underscore_options(args)), run=False)


def fit_rate(recipe: str, steps: int, warmup_steps: int, overrides: list[str]) -> dict:
    """Images/s of `resnet fit --config recipe *overrides` on one device over `steps` steps after `warmup_steps`
    (validation, logger and progress bar off; checkpoints into a temporary folder), and the settings that
    decide the matching synthetic ceiling: arch, batch_size, crop_size, precision, channels_last, compile,
    accelerator (`cpu` or `gpu`), backend, num_workers."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps}: at least 1 (the timed window opens at the end of a step)")
    with tempfile.TemporaryDirectory() as run_dir:  # the bench's checkpoints and logs are not kept
        cli = fit_cli(["--config", recipe, *overrides, "--trainer.max_steps", str(steps + warmup_steps),
                       "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.default_root_dir", run_dir,
                       "--trainer.enable_progress_bar", "false", "--trainer.devices", "1"])
        timer = StepTimer(warmup_steps, steps)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    if timer.rate is None:
        raise RuntimeError(f"{recipe}: training stopped after {cli.trainer.global_step} of {steps + warmup_steps} steps")
    hp, dm = cli.model.hparams, cli.datamodule
    return {"images_per_sec": timer.rate, "arch": hp.arch, "batch_size": dm.batch_size, "crop_size": dm.hparams.crop_size,
            "precision": str(cli.trainer.precision), "channels_last": hp.channels_last, "compile": hp.compile,
            "accelerator": "cpu" if cli.trainer.strategy.root_device.type == "cpu" else "gpu",
            "backend": dm.hparams.backend, "num_workers": default_num_workers(dm.hparams.num_workers)}


def bench_fit(recipe: str = "configs/demo.yaml", steps: int = 30, warmup_steps: int = 5, overrides: list[str] = []) -> dict:
    """The full pipeline (loader + model + optimizer, one process) against the synthetic ceiling of the same
    model, batch, crop, precision, layout and compilation: prints the ratio.

    Args:
        recipe: a `resnet fit` config file, e.g. configs/imagenet_r50.yaml. (Not named `config`: jsonargparse's
            auto_cli drops a parameter of that name, so `--config X` silently benchmarked the default recipe.)
        steps: steps timed (after warm-up), within the first epoch.
        warmup_steps: steps before timing (with `--model.compile true`: the compilation).
        overrides: extra `resnet fit` arguments, e.g. ["--data.backend", "dali", "--data.root", "/data/imagenet"].
    """
    fit = fit_rate(recipe, steps, warmup_steps, overrides)
    ceiling = bench_model(fit["arch"], fit["batch_size"], fit["crop_size"], fit["precision"], fit["channels_last"],
                          steps=min(steps, 20), warmup_steps=warmup_steps, accelerator=fit["accelerator"],
                          compile=fit["compile"])
    row = {"recipe": recipe, "backend": fit["backend"], "fit_images_per_sec": fit["images_per_sec"],
           "ceiling_images_per_sec": ceiling}
    console().print(f"full pipeline {fit['images_per_sec']:.1f} images/s = {100 * fit['images_per_sec'] / ceiling:.0f}% "
                    f"of the synthetic ceiling {ceiling:.1f}")
    return row
