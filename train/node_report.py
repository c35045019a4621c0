"""`resnet bench node` (`make gpu-check`): what one machine does with this project, in one report: machine and
versions, then the parts of train/node_parts.py and train/node_gpu_tests.py (training-step ceiling, full pipeline
per loader backend, loaders alone, evaluation protocols, Lightning's overhead, the GPU tests), written to
<output>/node_report.json and node_report.md and printed as a table. Exit status 0 when every part is ok or
skipped, 1 when one failed."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datamodules.backends import BACKENDS
from datamodules.demo import write_bench_dataset
from datamodules.loaders import usable_cpus
from datamodules.transforms import PROTOCOLS, Protocol
from train import node_gpu_tests, node_parts
from train.callbacks import git_commit
from train.evaluate import exit_with_error
from train.networks import Arch

SCHEMA = "resnet-node-report/1"


def _gpu_driver() -> str:
    """The NVIDIA driver version (nvidia-smi, else /proc/driver/nvidia/version); torch knows only CUDA's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        words = proc.read_text().split()
        return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), "unknown")
    return "none (no NVIDIA driver found)"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """hostname, GPUs (model, count, memory in GiB), NVIDIA driver, CPUs this process may use (affinity) and the
    machine's, CPU model, memory in GiB, OS."""
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "hostname": socket.gethostname(),
        "gpu_model": gpus[0].name if gpus else "none",
        "gpu_count": len(gpus),
        "gpu_memory_gib": [round(g.total_memory / 2**30, 1) for g in gpus],
        "driver_version": _gpu_driver() if gpus else "none (no CUDA GPU)",
        "cpu_count": usable_cpus(),
        "cpu_count_machine": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
    }


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """python, torch, CUDA (torch.version.cuda), cuDNN, lightning, torchvision, DALI (its wheel's name: the CUDA it
    is built for), FFCV; `not installed` where absent."""
    dali = next((f"{d.version} ({d.metadata['Name']})" for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), "not installed")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cudnn": str(cudnn) if cudnn else "not available",
        "lightning": _dist_version("lightning"),
        "torchvision": _dist_version("torchvision"),
        "dali": dali,
        "ffcv": _dist_version("ffcv"),
    }


def resolve_sizes(gpu: bool, **given) -> node_parts.Sizes:
    """The parts' settings: what was given, else ImageNet sizes on a GPU (three models, batch 256, 224 px, bf16, 30
    timed steps) and small ones on a CPU (ResNet-50 at 32 px, batch 8, float32, 3 steps: ~1-2 min on 2 cores)."""
    defaults = dict(
        accelerator="gpu" if gpu else "cpu",
        models=["resnet50", "resnet101", "resnet152"] if gpu else ["resnet50"],
        compiled_models=["resnet50"] if gpu else [],
        batch_size=256 if gpu else 8, crop_size=224 if gpu else 32, precision="bf16-mixed" if gpu else "32-true",
        steps=30 if gpu else 3, warmup_steps=5 if gpu else 1, num_workers=usable_cpus(),
        eval_arch="resnet50" if gpu else "resnet18", eval_batch_size=64 if gpu else 6, val_per_class=200 if gpu else 2,
    )
    s = node_parts.Sizes(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    for name in ("batch_size", "steps", "warmup_steps", "num_workers", "eval_batch_size", "val_per_class"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name} {getattr(s, name)}: must be at least 1")
    if s.crop_size < 32:
        raise ValueError(f"--crop_size {s.crop_size}: must be at least 32 pixels (ResNet's 32x downsampling)")
    if s.root is not None and not all((Path(s.root) / split).is_dir() for split in ("train", "val")):
        raise ValueError(f"--root {s.root}: expected an ImageNet-layout folder with train/ and val/")
    return s


def _dataset(s: node_parts.Sizes):
    """The images of the fit, data and eval parts: --root, else generated once (all CPUs) and cached under .cache/."""
    root: list[str] = []

    def get() -> str:
        if not root:
            root.append(s.root or str(write_bench_dataset(s.images_per_class, s.val_per_class)))
        return root[0]

    return get


def run_parts(s: node_parts.Sizes, dataset, selected: list[str], gpu_tests: bool, gpu_tests_timeout_s: int,
              output: Path, save) -> list[dict]:
    """Every selected part in order, `save(rows)` after each (a run stopped later keeps them); the GPU tests last
    (they need the GPU's memory, freed by then)."""
    rows: list[dict] = []
    parts = {
        "ceiling": lambda: node_parts.ceiling_rows(s),
        "fit": lambda: node_parts.fit_rows(s, dataset, [r for r in rows if r["part"] == "ceiling"]),
        "data": lambda: node_parts.data_rows(s, dataset),
        "eval": lambda: node_parts.eval_rows(s, dataset),
        "overhead": lambda: [node_parts.overhead_row(s)],
        "gpu_tests": lambda: [node_gpu_tests.gpu_tests_row(gpu_tests, gpu_tests_timeout_s, output)],
    }
    for part, run in parts.items():
        if part in selected:
            rows += run()
            save(rows)
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


_COMMON_HEAD = [("configuration", lambda r: r["name"]), ("status", lambda r: r["status"])]
_COMMON_TAIL = [("peak GPU GiB", lambda r: _num(r["peak_gpu_mem_gib"], 2)), ("s", lambda r: _num(r["seconds"])),
                ("reason", lambda r: r["reason"])]
_RATE = [("images/s", lambda r: _num(r["images_per_sec"]))]
# Per part: the section title and its own columns between the common ones.
SECTIONS = {
    "ceiling": ("Training-step ceiling: synthetic tensors on the device (`resnet bench model`)", _RATE),
    "fit": (f"Full training pipeline per loader backend (`resnet bench fit`, {node_parts.RECIPE})", _RATE + [
        ("ceiling images/s", lambda r: _num(r.get("ceiling_images_per_sec"))),
        ("share of the ceiling", lambda r: "" if r.get("ratio_to_ceiling") is None else f"{100 * r['ratio_to_ceiling']:.0f}%"),
        ("ceiling from", lambda r: r.get("ceiling_source", ""))]),
    "data": ("Loaders alone: RandomResizedCrop + flip + normalise, no model (`resnet bench data`)", _RATE),
    "eval": ("Evaluation protocols, randomly initialised network (`resnet bench eval`)", [
        ("views", lambda r: r.get("views", "")), ("images", lambda r: r.get("images", ""))] + _RATE + [
        ("views/s", lambda r: _num(r["images_per_sec"] * r["views"]) if r.get("views") and r["images_per_sec"] else "")]),
    "overhead": ("Lightning's overhead: `Trainer.fit` against a raw PyTorch loop, one batch reused on the device", [
        ("raw loop images/s", lambda r: _num(r.get("raw_images_per_sec"))),
        ("Trainer.fit images/s", lambda r: _num(r.get("lightning_images_per_sec"))),
        ("overhead (1 - fit/raw)", lambda r: "" if r.get("overhead_pct") is None else f"{r['overhead_pct']:.1f}%")]),
    "gpu_tests": ("GPU tests (`pytest -m gpu`)", [
        (k, lambda r, k=k: r.get(k, "")) for k in ("passed", "failed", "errors", "skipped")] + [
        ("failing tests", lambda r: ", ".join(r.get("failed_tests", [])))]),
}


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def report_markdown(report: dict) -> str:
    """The report as Markdown: machine, versions, one table per part, ready to paste into docs/BENCHMARKS.md."""
    m, v = report["machine"], report["versions"]
    memory = ", ".join(f"{g} GiB" for g in m["gpu_memory_gib"])
    gpus = f"{m['gpu_count']} x {m['gpu_model']} ({memory})" if m["gpu_count"] else "none"
    lines = [f"# Node report: {m['hostname']}", "",
             f"{report['date']} · git commit `{report['git_commit']}` · {report['seconds']:.0f} s in all"
             + (f" · `{report['command']}`" if report.get("command") else ""), "", "## Machine", ""]
    lines += _table(["GPU", "NVIDIA driver", "CPUs (usable / machine)", "CPU model", "memory", "OS"],
                    [[gpus, m["driver_version"], f"{m['cpu_count']} / {m['cpu_count_machine']}", m["cpu_model"],
                      f"{m['memory_gib']} GiB", m["os"]]])
    lines += ["", "## Versions", ""] + _table(list(v), [list(v.values())])
    for part, (title, columns) in SECTIONS.items():
        rows = [r for r in report["parts"] if r["part"] == part]
        if rows:
            cols = _COMMON_HEAD + columns + _COMMON_TAIL
            lines += ["", f"## {title}", ""] + _table([h for h, _ in cols], [[f(r) for _, f in cols] for r in rows])
    if report["failed"]:
        lines += ["", "## Failed", ""] + [f"- {_cell(f)}" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def print_summary(report: dict, json_path: Path, md_path: Path) -> None:
    table = Table(title=f"resnet bench node: {report['machine']['hostname']}, {report['machine']['gpu_count']} x "
                        f"{report['machine']['gpu_model']}, {report['seconds']:.0f} s")
    for col in ("part", "name", "status", "images/s", "vs ceiling, overhead, tests", "peak GiB", "s"):
        table.add_column(col, justify="right" if col in ("images/s", "peak GiB", "s") else "left")
    for r in report["parts"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:120]}"
        table.add_row(r["part"], escape(r["name"]), escape(status),
                      f"{r['images_per_sec']:.1f}" if r["images_per_sec"] else "", _extra(r),
                      f"{r['peak_gpu_mem_gib']:.1f}" if r["peak_gpu_mem_gib"] is not None else "", f"{r['seconds']:.1f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # logs: wider than results' 100 columns
    print(f"Report: {json_path} and {md_path}")  # one line, never wrapped


def _extra(r: dict) -> str:
    if r.get("ratio_to_ceiling") is not None:
        return f"{100 * r['ratio_to_ceiling']:.0f}% of {r['ceiling_images_per_sec']:.1f}"
    if r.get("overhead_pct") is not None:
        return f"{r['overhead_pct']:.1f}% (raw {r['raw_images_per_sec']:.1f})"
    if r.get("passed") is not None:
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    return ""


def _finite(value):
    """The report with NaN and infinities as null: JSON has no such numbers (Python would write bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict, out: Path) -> None:
    """<out>/node_report.json and node_report.md, then the summary table and where they are."""
    json_path, md_path = out / "node_report.json", out / "node_report.md"
    json_path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    md_path.write_text(report_markdown(report))
    print_summary(report, json_path, md_path)


def bench_node(
    output: str = "runs/gpu_check",
    parts: list[node_parts.Part] = list(node_parts.PARTS),
    models: Optional[list[Arch]] = None,
    layouts: list[node_parts.Layout] = ["channels_last", "nchw"],
    compiled_models: Optional[list[Arch]] = None,
    compiled_layouts: list[node_parts.Layout] = ["channels_last"],
    backends: list[node_parts.BackendName] = list(BACKENDS),
    protocols: list[Protocol] = list(PROTOCOLS),
    batch_size: Optional[int] = None,
    crop_size: Optional[int] = None,
    precision: Optional[Literal["bf16-mixed", "16-mixed", "32-true"]] = None,
    steps: Optional[int] = None,
    warmup_steps: Optional[int] = None,
    num_workers: Optional[int] = None,
    fit_compile: bool = False,
    root: Optional[str] = None,
    val_per_class: Optional[int] = None,
    eval_arch: Optional[Arch] = None,
    eval_batch_size: Optional[int] = None,
    gpu_tests: bool = True,
    gpu_tests_timeout_s: int = 600,
) -> dict:
    """Measure this machine with the project: writes <output>/node_report.json and node_report.md, prints a table.
    On a GPU ~6-8 min with the defaults (H100/H200, 16 cores); without one the same parts at small sizes, ~1-2 min.
    Exits with status 1 after writing the report when a part failed.

    Args:
        output: folder for node_report.json, node_report.md (and gpu_tests.xml).
        parts: parts to run, in this order: ceiling, fit, data, eval, overhead, gpu_tests.
        models: ceiling models, eager, each in every layout; None = resnet50/101/152 (GPU), resnet50 (CPU).
        layouts: ceiling memory layouts: channels_last, nchw.
        compiled_models: ceiling models also timed with torch.compile; None = resnet50 (GPU), none (CPU).
        compiled_layouts: layouts of the compiled ceiling rows.
        backends: loader backends of the fit and data parts: torchvision, dali (nvJPEG on a GPU), ffcv.
        protocols: evaluation protocols: center, 10crop, multiscale.
        batch_size: images per step; None = 256 (GPU), 8 (CPU).
        crop_size: training crop side in pixels (evaluation geometry scales with it); None = 224 (GPU), 32 (CPU).
        precision: bf16-mixed, 16-mixed or 32-true; None = bf16-mixed (GPU), 32-true (CPU).
        steps: timed steps (batches for the data part); None = 30 (GPU), 3 (CPU).
        warmup_steps: steps before timing (compilation, cuDNN, loader start-up, FFCV's JIT); None = 5 (GPU), 1 (CPU).
        num_workers: loader workers of the fit and data parts; None = the CPUs this process may use.
        fit_compile: the fit and overhead parts with `--model.compile true` (their ceiling then the compiled one).
        root: ImageNet-layout folder for the fit, data and eval parts (eval reads all of its val/; ffcv needs its
            <root>/ffcv/*.beton); None = generated 500x375 JPEGs, enough that no timed step repeats an image, cached
            under .cache/ (with their .beton files).
        val_per_class: generated val images per class (6 classes) for the eval part; None = 200 (GPU), 2 (CPU).
        eval_arch: network of the eval part; None = resnet50 (GPU), resnet18 (CPU).
        eval_batch_size: images per evaluation batch; None = 64 (GPU), 6 (CPU).
        gpu_tests: run `pytest -m gpu` last (skipped without a GPU).
        gpu_tests_timeout_s: seconds before the GPU tests are stopped and reported as failed.
    """
    start, out = time.perf_counter(), Path(output)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:  # bad input: an error naming the cause before anything runs, no traceback
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output {output}: exists and is not a folder")
        if gpu_tests_timeout_s < 1:
            raise ValueError(f"--gpu_tests_timeout_s {gpu_tests_timeout_s}: must be at least 1")
        unknown = [p for p in parts if p not in node_parts.PARTS]
        if unknown:
            raise ValueError(f"--parts {unknown}: unknown; expected some of {list(node_parts.PARTS)}")
        s = resolve_sizes(torch.cuda.is_available(), models=models, layouts=list(layouts), compiled_models=compiled_models,
                          compiled_layouts=list(compiled_layouts), backends=list(backends), protocols=list(protocols),
                          batch_size=batch_size, crop_size=crop_size, precision=precision, steps=steps,
                          warmup_steps=warmup_steps, num_workers=num_workers, fit_compile=fit_compile, root=root,
                          val_per_class=val_per_class, eval_arch=eval_arch, eval_batch_size=eval_batch_size)
    except ValueError as e:
        exit_with_error("resnet bench node", e)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _dataset(s)
    if {"fit", "data", "eval"} & set(parts):
        try:  # before CUDA starts (machine_info below): the writer processes can be forked, not spawned
            dataset()
        except Exception:  # noqa: BLE001  each row that needs the images tries again and reports the error
            pass
    report = {"schema": SCHEMA, "command": shlex.join(["resnet", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
              "date": date, "git_commit": git_commit(), "machine": machine_info(), "versions": versions(), "options": asdict(s)}
    def save(rows: list[dict]) -> None:  # the parts so far, marked incomplete until the last one
        partial = {**report, "parts": rows, "incomplete": True, "seconds": time.perf_counter() - start, "failed": []}
        (out / "node_report.json").write_text(json.dumps(_finite(partial), indent=2, allow_nan=False) + "\n")

    report["parts"] = run_parts(s, dataset, list(parts), gpu_tests, gpu_tests_timeout_s, out, save)
    report["seconds"], report["incomplete"] = time.perf_counter() - start, False
    report["failed"] = [f"{r['part']}: {r['name']}: {r['reason']}" for r in report["parts"] if r["status"] == "failed"]
    write_report(report, out)
    if report["failed"]:
        print("resnet bench node: failed parts:\n  " + "\n  ".join(report["failed"]), file=sys.stderr)
        raise SystemExit(1)
    return report
