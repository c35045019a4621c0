"""`resnet bench demo`: how much the demo's accuracy moves with what differs between machines. The demo recipe
(configs/demo.yaml) trained once per condition, each a `resnet fit` of its own: the machine's defaults, one torch
thread (a sum's order follows the thread count), the AVX2 kernels an older CPU runs (torch's ATen and oneDNN
capped at AVX2), and two other seeds (the run-to-run spread any change of float rounding ends up in)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from rich.table import Table

from datamodules.demo import write_demo_dataset
from train.bench import console

REPO = Path(__file__).resolve().parent.parent

# name -> (environment, options): what differs from the reference run.
CONDITIONS = {
    "reference": ({}, []),
    "one_thread": ({"OMP_NUM_THREADS": "1"}, []),
    # x86 CPUs without AVX-512: torch's own kernels (ATen's dispatch) and oneDNN's convolutions at AVX2.
    "avx2_kernels": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    "seed_1": ({}, ["--seed_everything", "1", "--data.seed", "1"]),
    "seed_2": ({}, ["--seed_everything", "2", "--data.seed", "2"]),
}


def _val_curve(run: Path) -> list[float]:
    with open(run / "logs/version_0/metrics.csv") as f:
        return [float(row["val/acc1"]) for row in csv.DictReader(f) if row.get("val/acc1")]


def bench_demo(
    conditions: Optional[list[str]] = None,
    root: str = ".cache/demo_imagenet",
    output: str = "runs/demo_variance",
    max_epochs: Optional[int] = None,
    timeout_s: int = 3600,
) -> list[dict]:
    """Trains the demo recipe once per condition and reports its best and last val top-1 and their differences
    from the reference run's.

    Args:
        conditions: names from reference, one_thread, avx2_kernels, seed_1, seed_2; None = all (~15 min on a
            2-core machine).
        root: the demo dataset (written by `resnet prepare demo` when missing).
        output: one run folder per condition, and demo_variance.{json,md}.
        max_epochs: None = the recipe's 12.
        timeout_s: bound of each training run in seconds.

    Returns:
        One row per condition: condition, env, options, best_acc1 and last_acc1 (fractions), their differences
        from the reference's (percentage points; None without a reference row), curve (val/acc1 per epoch), seconds.

    Raises:
        ValueError: an unknown condition name.
        RuntimeError: a run that failed or ran past timeout_s, naming it and its log.
    """
    names = conditions or list(CONDITIONS)
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ValueError(f"--conditions {unknown}: expected some of {', '.join(CONDITIONS)}")
    root, out = str(Path(root).resolve()), Path(output).resolve()  # the fits run in the checkout, this from anywhere
    if not (Path(root) / "train").is_dir():
        write_demo_dataset(root)
    rows = []
    for name in names:
        env, options = CONDITIONS[name]
        run = out / name
        # The installed `resnet` script: its signal handling and start-up, as a user runs it.
        args = [str(Path(sys.executable).parent / "resnet"), "fit", "--config", str(REPO / "configs/demo.yaml"), "--data.root", root,
                "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false", *options]
        if max_epochs is not None:
            args += ["--trainer.max_epochs", str(max_epochs)]
        if run.exists():
            shutil.rmtree(run)  # a rerun replaces its folder: fit refuses a run folder holding last.ckpt
        run.mkdir(parents=True)
        start = time.perf_counter()
        with open(run / "fit.log", "w") as log:
            try:
                proc = subprocess.run(args, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"condition {name}: the fit ran past {timeout_s} s (log: {run / 'fit.log'})") from None
        if proc.returncode != 0:
            raise RuntimeError(f"condition {name}: the fit exited {proc.returncode} (log: {run / 'fit.log'})")
        curve = _val_curve(run)
        rows.append({"condition": name, "env": env, "options": options, "best_acc1": max(curve), "last_acc1": curve[-1],
                     "curve": curve, "seconds": time.perf_counter() - start})
    reference = next((r for r in rows if r["condition"] == "reference"), None)
    for r in rows:
        for key in ("best_acc1", "last_acc1"):
            r[f"{key}_diff_pts"] = 100 * (r[key] - reference[key]) if reference else None
    table = Table(title="Demo recipe (ResNet-18, 960 images, 240 val) by condition")
    for column in ("condition", "best val top-1 %", "last %", "best - reference (pts)", "seconds"):
        table.add_column(column)
    for r in rows:
        diff = "" if r["best_acc1_diff_pts"] is None else f"{r['best_acc1_diff_pts']:+.2f}"
        table.add_row(r["condition"], f"{100 * r['best_acc1']:.2f}", f"{100 * r['last_acc1']:.2f}", diff,
                      f"{r['seconds']:.0f}")
    console().print(table)
    (out / "demo_variance.json").write_text(json.dumps(rows, indent=2))
    lines = ["| condition | best val top-1 % | last % | best - reference (pts) |", "|---|---|---|---|"]
    lines += [f"| {r['condition']} | {100 * r['best_acc1']:.2f} | {100 * r['last_acc1']:.2f} | "
              f"{'' if r['best_acc1_diff_pts'] is None else format(r['best_acc1_diff_pts'], '+.2f')} |" for r in rows]
    (out / "demo_variance.md").write_text("\n".join(lines) + "\n")
    return rows
