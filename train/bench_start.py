"""`resnet bench start`: the time from `resnet fit` starting to its first training step on a tree of many tiny
files, with several ranks, when the ranks find their samples by a folder scan (rank 0 lists, the others receive)
and from the manifest of `resnet prepare check` (no class folder listed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
from PIL import Image

from datamodules.manifest import default_paths
from train.results import console

REPO = Path(__file__).resolve().parents[1]


class FirstStepTime(pl.Callback):
    """Writes the wall-clock time (time.time(), s) at the first training batch's start to `out` (rank 0)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0 and trainer.is_global_zero:
            Path(self.out).write_text(json.dumps({"first_step": time.time()}))


def write_tiny_tree(root: Path, files: int, classes: int = 1000, val_per_class: int = 1) -> Path:
    """`files` training images in `classes` class folders (+ `val_per_class` each in val/), hard links to a few
    16x16 JPEGs: a tree whose cost is its directory entries, as ImageNet's on a shared file system."""
    marker = root / "tiny_tree.json"
    spec = {"files": files, "classes": classes, "val_per_class": val_per_class}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    per_class = -(-files // classes)
    made = links = 0
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", min(per_class, files - made)), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                if links % 50_000 == 0:  # ext4 allows 65,000 links to a file
                    source = root / f"tiny{links // 50_000}.jpg"
                    pixels = np.random.default_rng(links).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(source)
                os.link(source, folder / f"{wnid}_{i}.JPEG")
                links += 1
        made += min(per_class, files - made)
    marker.write_text(json.dumps(spec))
    return root


def _drop_caches() -> bool:
    """Empties the page, dentry and inode caches (root only): listings then read the disk, as a cold start."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_to_first_step(root: Path, ranks: int, classes: int, run_dir: Path) -> float:
    """Seconds from launching `resnet fit` (`ranks` CPU processes, gloo) to its first training step."""
    out = run_dir / "first_step.json"
    args = [
        str(Path(sys.executable).parent / "resnet"), "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--data.root", str(root), "--model.num_classes", str(classes), "--data.crop_size", "16",
        "--data.val_resize_size", "16", "--data.batch_size", str(2 * ranks), "--data.num_workers", "0",
        "--trainer.devices", str(ranks), "--trainer.strategy", "ddp", "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.callbacks+=train.bench_start.FirstStepTime", f"--trainer.callbacks.out={out}",
    ]
    start = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"resnet fit exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())["first_step"] - start


def bench_start(root: Optional[str] = None, files: int = 200_000, classes: int = 1000, ranks: int = 2,
                repeats: int = 2, cold: bool = True) -> list[dict]:
    """Start-up time to the first training step, folder scan vs manifest, on a generated tree.

    Args:
        root: where the tree is written (kept for reuse); None = a temporary folder, removed afterwards. Put it
            on the file system to measure (e.g. the cluster's shared one).
        files: training images (hard links to one tiny JPEG); classes: class folders.
        ranks: training processes (CPU, gloo: the start-up path is the GPU one's).
        repeats: runs per mode; each row is one run.
        cold: empty the OS caches before each run (needs root; recorded per row).

    Returns:
        Rows {mode, run, seconds_to_first_step, cold_cache, files, ranks}, and one {mode: "check"} row with the time of
        `resnet prepare check` that wrote the manifest.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tree = write_tiny_tree(Path(root) if root else Path(scratch) / "tree", files, classes)
        for path in default_paths(tree):
            path.unlink(missing_ok=True)
        rows = []
        for mode in ("scan", "manifest"):
            if mode == "manifest":
                start = time.time()
                subprocess.run([str(Path(sys.executable).parent / "resnet"), "prepare", "check", "--root", str(tree)],
                               check=True, capture_output=True, timeout=3600, cwd=REPO)
                rows.append({"mode": "check", "run": 0, "seconds": round(time.time() - start, 1), "files": files})
                console().print(rows[-1])
            for run in range(repeats):
                dropped = _drop_caches() if cold else False
                with tempfile.TemporaryDirectory(dir=scratch) as run_dir:
                    seconds = time_to_first_step(tree, ranks, classes, Path(run_dir))
                rows.append({"mode": mode, "run": run, "seconds_to_first_step": round(seconds, 2),
                             "cold_cache": dropped, "files": files, "ranks": ranks})
                console().print(rows[-1])
        for path in default_paths(tree):
            path.unlink(missing_ok=True)
    return rows
