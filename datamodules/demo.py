"""A small learnable dataset in the ImageNet folder layout: textures drawn procedurally, saved as .JPEG files
of varied sizes and aspect ratios, written once and deterministically into a cache folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from datamodules.loaders import usable_cpus

# WordNet-style ids (n + 8 digits) in a range no real synset uses, so demo labels are never mistaken for ImageNet's.
DEMO_CLASSES = {
    "n90000001": "horizontal stripes",
    "n90000002": "vertical stripes",
    "n90000003": "diagonal stripes",
    "n90000004": "grid",
    "n90000005": "polka dots",
    "n90000006": "concentric rings",
}


def _draw(kind: str, rng: np.random.Generator, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    h, w = int(rng.integers(96, 193)), int(rng.integers(96, 257))
    if size is not None:
        w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(10, 26)
    phase = rng.uniform(0, 2 * np.pi)
    tilt = np.deg2rad(rng.uniform(-12, 12))
    if kind == "horizontal stripes":
        field = np.sin(2 * np.pi * (y * np.cos(tilt) + x * np.sin(tilt)) / period + phase)
    elif kind == "vertical stripes":
        field = np.sin(2 * np.pi * (x * np.cos(tilt) - y * np.sin(tilt)) / period + phase)
    elif kind == "diagonal stripes":
        angle = np.deg2rad(rng.choice([45.0, 135.0]) + rng.uniform(-10, 10))
        field = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    elif kind == "grid":
        lines = np.minimum(np.abs(np.sin(np.pi * x / period + phase)), np.abs(np.sin(np.pi * y / period + phase)))
        field = np.where(lines < 0.3, 1.0, -1.0)
    elif kind == "polka dots":
        cy, cx = (y + rng.uniform(0, period)) % period, (x + rng.uniform(0, period)) % period
        radius = np.hypot(cy - period / 2, cx - period / 2)
        field = np.where(radius < period * rng.uniform(0.2, 0.35), 1.0, -1.0)
    elif kind == "concentric rings":
        radius = np.hypot(y - rng.uniform(0.2, 0.8) * h, x - rng.uniform(0.2, 0.8) * w)
        field = np.sin(2 * np.pi * radius / period + phase)
    else:
        raise ValueError(kind)
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 150:  # keep the pattern visible
        bg = rng.uniform(0, 255, 3)
    mix = (field[..., None] > 0).astype(np.float32)
    image = mix * fg + (1 - mix) * bg + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_demo_dataset(
    dst: str | Path,
    train_per_class: int = 160,
    val_per_class: int = 40,
    seed: int = 0,
    image_size: Optional[tuple[int, int]] = None,
) -> Path:
    """Write the demo dataset into `dst` (once: an existing complete copy with the same spec is kept).

    Args:
        dst: folder to hold `train/` and `val/`.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        seed: seed of the drawing; the same spec gives the same bytes.
        image_size: (width, height) of every image, e.g. [500, 375] for ImageNet-sized JPEGs in benchmarks;
            None = varied sizes of 96-256 pixels.
    """
    dst = Path(dst)
    spec = {"classes": DEMO_CLASSES, "train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed}
    if image_size is not None:
        spec["image_size"] = list(image_size)
    marker = dst / "demo_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"{dst}: the demo dataset with this spec is there already: kept", flush=True)
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count, offset in (("train", train_per_class, 0), ("val", val_per_class, 1_000_000)):
        for c, (wnid, kind) in enumerate(DEMO_CLASSES.items()):
            folder = tmp / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, c, offset + i])
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * count + i + 1:08d}.JPEG"
                Image.fromarray(_draw(kind, rng, image_size)).save(folder / name, "JPEG", quality=90)
    (tmp / "synsets.txt").write_text("".join(f"{w} {n}\n" for w, n in DEMO_CLASSES.items()))
    (tmp / "demo_spec.json").write_text(json.dumps(spec))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)  # appear complete or not at all
    return dst


# Images per class and split in one writer task (32 x 6 classes: ~5 s of one core). The tasks depend on the counts
# alone, so a request gives the same files on any machine, whatever its number of CPUs.
_SHARD_IMAGES = 32


def _write_shard(task: tuple) -> None:
    write_demo_dataset(*task)


def write_bench_dataset(train_per_class: int, val_per_class: int, image_size: tuple[int, int] = (500, 375),
                        workers: Optional[int] = None, cache: str = ".cache") -> Path:
    """ImageNet-sized JPEGs (the demo's 6 texture classes, quality 90) for benchmarks, written once into
    `<cache>/bench_<w>x<h>_<train>_<val>` by several processes: a 500x375 image costs ~30 ms of one core to
    draw and encode, so the 9,216 of a GPU run take ~5 min on one core, ~20 s on 16.

    Args:
        train_per_class: training images per class.
        val_per_class: validation images per class.
        image_size: (width, height) of every image; 500x375 is ImageNet's most common size.
        workers: writer processes; None = the CPUs this process may use.
        cache: folder holding the generated sets.
    """
    w, h = image_size
    dst = Path(cache) / f"bench_{w}x{h}_{train_per_class}_{val_per_class}"
    spec = {"train_per_class": train_per_class, "val_per_class": val_per_class, "image_size": [w, h], "shard": _SHARD_IMAGES}
    marker = dst / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"{dst}: the benchmark dataset with this spec is there already: kept", flush=True)
        return dst
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")  # several runs on one shared checkout: one each
    shutil.rmtree(tmp, ignore_errors=True)
    chunks = lambda n: [min(_SHARD_IMAGES, n - i) for i in range(0, n, _SHARD_IMAGES)]
    train, val = chunks(train_per_class), chunks(val_per_class)
    count = max(len(train), len(val), 1)
    train, val = train + [0] * (count - len(train)), val + [0] * (count - len(val))
    # Shard k is the demo set drawn with seed k: every image differs, and the same request draws the same ones.
    tasks = [(tmp / f"shard{k}", train[k], val[k], k, (w, h)) for k in range(count)]
    workers = min(workers or usable_cpus(), count)
    if workers > 1:
        # fork: no re-import of torch in each process; spawn once CUDA has started (a forked CUDA context breaks).
        import torch  # only to ask whether CUDA has started here

        context = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_write_shard, tasks))
    else:
        for task in tasks:
            _write_shard(task)
    for split in ("train", "val"):
        for wnid in DEMO_CLASSES:
            (tmp / split / wnid).mkdir(parents=True)
            for k, task in enumerate(tasks):
                for image in sorted((task[0] / split / wnid).glob("*.JPEG")):
                    os.replace(image, tmp / split / wnid / f"s{k}_{image.name}")
    shutil.copy(tasks[0][0] / "synsets.txt", tmp / "synsets.txt")
    for task in tasks:
        shutil.rmtree(task[0])
    (tmp / marker.name).write_text(json.dumps(spec))
    shutil.rmtree(dst, ignore_errors=True)
    try:
        tmp.rename(dst)  # complete or absent
    except OSError:  # another run renamed its identical copy first
        if not (marker.is_file() and json.loads(marker.read_text()) == spec):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
