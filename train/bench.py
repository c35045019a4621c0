"""`resnet bench ...`: throughput measurements behind docs/BENCHMARKS.md (scripts, not timed tests)."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Optional

import torch
from rich.table import Table

from datamodules.demo import write_demo_dataset
from train.evaluate import evaluate
from train.model import Arch, build_resnet
from train.results import console


def bench_eval(
    arch: Arch = "resnet50",
    root: Optional[str] = None,
    images_per_class: int = 6,
    image_size: tuple[int, int] = (500, 375),
    protocols: list[str] = ["center", "10crop", "multiscale"],
    batch_size: int = 12,
    num_workers: Optional[int] = None,
    accelerator: str = "auto",
) -> list[dict]:
    """Images/s of `resnet evaluate` under each protocol at ImageNet geometry (resize 256, crop 224, scales
    224-640), with a randomly initialised network: the speed does not depend on the weights.

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
    """
    if root is None:
        w, h = image_size
        root = str(write_demo_dataset(f".cache/bench_{w}x{h}_{images_per_class}", 1, images_per_class, image_size=(w, h)))
    classes = len([p for p in (Path(root) / "val").iterdir() if p.is_dir()])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{arch}.pth"
        torch.save(build_resnet(arch, num_classes=classes).state_dict(), weights)
        for protocol in protocols:
            result = evaluate(
                weights=str(weights), protocol=protocol, data={"root": root, "batch_size": batch_size, "num_workers": num_workers},
                trainer={"accelerator": accelerator, "devices": 1, "enable_progress_bar": False},
            )
            rows.append({k: result[k] for k in ("protocol", "views", "views_detail", "images", "images_per_sec", "precision")})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and accelerator != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    table = Table(title=f"resnet evaluate throughput: {arch}, {device}, batch {batch_size}")
    for col in ("protocol", "views", "images", "images/s", "views/s", "precision"):
        table.add_column(col, justify="left" if col in ("protocol", "precision") else "right")
    for r in rows:
        table.add_row(r["views_detail"], str(r["views"]), str(r["images"]), f"{r['images_per_sec']:.2f}",
                      f"{r['images_per_sec'] * r['views']:.1f}", r["precision"])
    console().print(table)
    return rows
