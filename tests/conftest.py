from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# `make test` runs two pytest-xdist workers: each gets its share of the cores for torch's (OpenMP) threads, and the
# processes its tests start inherit it. Two workers with a thread a core each spin-wait on each other's cores: the
# whole suite took ~40 % more CPU time (34 against 25 CPU-minutes, 2026-12-07).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.demo import write_demo_dataset
from tests.resnet_forks import ResnetForks

REPO = Path(__file__).resolve().parent.parent
RESNET = str(Path(sys.executable).parent / "resnet")


# The longest tests first: `make test` runs two pytest-xdist workers, and a long test started last would leave one
# worker idle while it runs (the SLURM tests share one worker: one cluster at a time, pytest_xdist_make_scheduler).
FIRST = ("tests/test_slurm.py", "tests/test_fit.py::test_demo_recipe")


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s scheduler: pytest-xdist's load-scope scheduling with every test a unit of its own except the
    SLURM tests, one unit (their module-scoped cluster starts once, on one worker). `--dist loadgroup` would do this
    with an `xdist_group` mark, but pytest-xdist 3.8 marks the group by rewriting `item._nodeid`, which pytest 9.2
    no longer reads: the SLURM tests ran on both workers, two clusters at once (CI, 2026-12-04)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/test_slurm.py" if nodeid.startswith("tests/test_slurm.py") else nodeid

    return SlurmTestsTogether(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests first; tests marked `gpu` need a CUDA device: skipped where there is none (CI, the
    development machines)."""
    items.sort(key=lambda item: next((i for i, p in enumerate(FIRST) if item.nodeid.startswith(p)), len(FIRST)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small copy of the demo dataset: 6 classes x 12 train, 6 x 5 val JPEGs. Read-only: copy to modify."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", train_per_class=12, val_per_class=5)


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> Path:
    """A private, modifiable copy of the small demo dataset."""
    return Path(shutil.copytree(demo_root, tmp_path / "imagenet"))


@contextmanager
def small_disk(path: Path, size: str, leave: int | None = None):
    """A real file system of `size` (a tmpfs, e.g. "20m") mounted at `path`, so that writes there fail with ENOSPC
    part-way, as on a full disk; `leave`: fill it up to that many bytes free. Skips the test where mounting is not
    allowed (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        if leave is not None:
            (path / ".filler").write_bytes(b"\0" * (shutil.disk_usage(path).free - leave))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=60)


def tiny_fit_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """`resnet fit` on the small demo set at 32 pixels: a few seconds per epoch on 2 cores."""
    return [
        "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--data.root", str(root), "--data.crop_size", "32", "--data.val_resize_size", "36",
        "--data.batch_size", "8", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        *extra,
    ]


_FORKS = ResnetForks(dict(os.environ))  # the environment before any test changes it


def run_resnet(*args: str, timeout: int = 300, env: dict | None = None, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """The `resnet` console script's entry point in a process of its own, forked from one that has imported it
    (tests/resnet_forks.py: ~11 CPU-seconds less a command; `RESNET_TEST_FORKS=0`: the installed script); fails the
    test with its output when the exit status is not `expect_rc` (2: a usage or input error)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if os.environ.get("RESNET_TEST_FORKS", "1") != "0":
        proc = _FORKS.run(list(args), env, REPO, timeout, Path(tempfile.gettempdir()) / "resnet-test-output")
    else:
        proc = subprocess.run([RESNET, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != expect_rc:
        raise AssertionError(f"resnet {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_metrics(log_root: Path) -> dict[str, float]:
    """Latest value of each metric in the newest `logs/version_N/metrics.csv` under a run directory."""
    versions = sorted((log_root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    values: dict[str, float] = {}
    with open(versions[-1] / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def write_imagenet_val(root: Path, per_class: int = 1) -> Path:
    """A 1000-class val folder of tiny JPEGs: what torchvision's ImageNet weights are evaluated on."""
    rng = np.random.default_rng(3)
    for c in range(1000):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"v{i}.JPEG", quality=90)
    return root
