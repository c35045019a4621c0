"""`resnet bench checkpoint`: what a periodic checkpoint costs on the run's file system."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from train.checkpointing import AtomicCheckpointIO
from train.networks import Arch, build_resnet
from train.results import console


def bench_checkpoint(arch: Arch = "resnet50", dst: Optional[str] = None, repeats: int = 3,
                     every_minutes: float = 30.0) -> dict:
    """The cost of a periodic checkpoint (`requeue.checkpoint_every_minutes`): the time to write one of `arch`
    (weights, BatchNorm buffers, SGD momentum) atomically (AtomicCheckpointIO: .partial, fsync, rename) into `dst`
    (default: a temporary folder; pass the run file system's folder, e.g. a Lustre or NFS path), and that time as
    a share of the interval.

    Args:
        arch: torchvision ResNet depth.
        dst: folder to write into (the file is removed afterwards).
        repeats: writes timed; the median is reported.
        every_minutes: the checkpoint interval the share is computed for.
    """
    if dst is not None and not Path(dst).is_dir():
        raise FileNotFoundError(f"--dst {dst}: no such folder (the file system to time the writes on)")
    net = build_resnet(arch)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # momentum buffers exist
    state = {"state_dict": net.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}
    with tempfile.TemporaryDirectory(dir=dst) as folder:
        path = Path(folder) / "periodic.ckpt"
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            AtomicCheckpointIO().save_checkpoint(state, path)
            times.append(time.perf_counter() - start)
        size = path.stat().st_size
    seconds = sorted(times)[len(times) // 2]
    row = {"arch": arch, "megabytes": round(size / 1e6, 1), "seconds": round(seconds, 3),
           "share_of_interval": seconds / (60 * every_minutes), "where": dst or tempfile.gettempdir()}
    console().print(f"{arch}: {row['megabytes']} MB checkpoint written in {seconds:.2f} s (median of {repeats}) to "
                  f"{row['where']}: {100 * row['share_of_interval']:.4f} % of a {every_minutes:g}-minute interval")
    return row
