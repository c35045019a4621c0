"""`resnet bench eval`: images/s of `resnet evaluate` under each ILSVRC protocol (a script, not a timed test)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from rich.table import Table

from datamodules.demo import write_bench_dataset
from datamodules.evaluation import EvalDataModule
from datamodules.loaders import default_num_workers
from datamodules.transforms import PAPER_SCALES, PROTOCOLS, EvalViews, Protocol
from train.bench import device_name, time_batches
from train.evaluate import evaluate
from train.networks import Arch, build_resnet
from train.results import console


def eval_rate(weights: str, root: str, protocol: str, *, batch_size: int, num_workers: Optional[int], accelerator: str,
              crop_size: int = 224, resize_size: int = 256, scales: list[int] = list(PAPER_SCALES)) -> dict:
    """One `resnet evaluate` run of a state-dict file on `root`/val under `protocol`: its protocol, views,
    views_detail, images, images_per_sec (after the first batch) and precision."""
    result = evaluate(
        weights=weights, protocol=protocol, crop_size=crop_size, resize_size=resize_size, scales=scales,
        data={"root": root, "batch_size": batch_size, "num_workers": num_workers},
        trainer={"accelerator": accelerator, "devices": 1, "enable_progress_bar": False},
    )
    return {k: result[k] for k in ("protocol", "views", "views_detail", "images", "images_per_sec", "precision")}


def bench_eval(
    arch: Arch = "resnet50",
    root: Optional[str] = None,
    images_per_class: int = 6,
    image_size: tuple[int, int] = (500, 375),
    protocols: list[Protocol] = list(PROTOCOLS),
    batch_size: int = 12,
    num_workers: Optional[int] = None,
    accelerator: str = "auto",
    time_loader: bool = False,
    crop_size: int = 224,
    resize_size: int = 256,
    scales: list[int] = list(PAPER_SCALES),
) -> list[dict]:
    """Images/s of `resnet evaluate` under each protocol, by default at ImageNet geometry (resize 256, crop 224,
    scales 224-640), with a randomly initialised network: the speed does not depend on the weights.

    Args:
        arch: network depth.
        root: an ImageNet-layout folder to read `val/` from; None = ImageNet-sized JPEGs (6 classes x
            `images_per_class`, quality 90) written once under .cache/.
        images_per_class: images per class of the generated set.
        image_size: (width, height) of the generated JPEGs; 500x375 is ImageNet's most common size.
        protocols: protocols to time.
        batch_size: images per loader batch (all views of each).
        num_workers: loader processes; None = the CPUs this process may use, at most 8.
        accelerator: `cpu`, `gpu` or `auto`.
        time_loader: also time the protocol's loader alone (same batch and workers, no model): when it is not
            much faster than the evaluation, decoding and resizing on the CPU are the bottleneck.
        crop_size: center and 10crop crop side, pixels.
        resize_size: center and 10crop shorter side before cropping, pixels.
        scales: multiscale shorter sides, pixels.
    """
    if root is None:
        root = str(write_bench_dataset(1, images_per_class, image_size=tuple(image_size)))
    classes = len([p for p in (Path(root) / "val").iterdir() if p.is_dir()])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{arch}.pth"
        torch.save(build_resnet(arch, num_classes=classes).state_dict(), weights)
        for protocol in protocols:
            row = eval_rate(str(weights), root, protocol, batch_size=batch_size, num_workers=num_workers,
                            accelerator=accelerator, crop_size=crop_size, resize_size=resize_size, scales=scales)
            if time_loader:
                views = EvalViews(protocol, crop_size=crop_size, resize_size=resize_size, scales=tuple(scales))
                dm = EvalDataModule(root, batch_size=batch_size, num_workers=num_workers, views=views)
                dm.setup("test")
                # As `resnet evaluate` times: images after the first batch (worker start-up excluded).
                row["loader_images_per_sec"] = time_batches(dm.test_dataloader(), 1, len(dm.dataset), lambda b: b[1:])
            rows.append(row)
    _print_eval_table(rows, arch, accelerator, batch_size, default_num_workers(num_workers), time_loader)
    return rows


def _print_eval_table(rows: list[dict], arch: str, accelerator: str, batch_size: int, workers: int, time_loader: bool) -> None:
    table = Table(title=f"resnet evaluate throughput: {arch}, {device_name(accelerator)}, batch {batch_size}, {workers} workers")
    columns = ["protocol", "views", "images", "images/s", "views/s", "precision"] + ["loader alone, images/s"] * time_loader
    for col in columns:
        table.add_column(col, justify="left" if col in ("protocol", "precision") else "right")
    for r in rows:
        table.add_row(r["views_detail"], str(r["views"]), str(r["images"]), f"{r['images_per_sec']:.2f}",
                      f"{r['images_per_sec'] * r['views']:.1f}", r["precision"],
                      *([f"{r['loader_images_per_sec']:.2f}"] if time_loader else []))
    console().print(table)
