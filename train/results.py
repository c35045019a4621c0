"""Evaluation result files (`resnet evaluate --output x.pt`), their accuracy, and ensembles of them."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from datamodules.prepare_io import disk_full

# What every result file holds; `probs` is float16 [images, classes], rows in `ids` order.
RESULT_KEYS = ("model", "arch", "protocol", "views", "ids", "labels", "classes", "probs")


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1/acc5 and top1_err/top5_err in percent, from exact counts of correct images (top-5 becomes top-C when
    there are fewer than 5 classes)."""
    probs, labels = probs.float(), labels.long()
    out: dict = {"images": int(labels.numel())}
    for k in (1, 5):
        top = probs.topk(min(k, probs.shape[1]), dim=1).indices
        correct = int((top == labels[:, None]).any(dim=1).sum())
        out[f"acc{k}"] = 100.0 * correct / max(1, labels.numel())
        out[f"top{k}_err"] = 100.0 - out[f"acc{k}"]
    return out


def atomic_write(path: Path, write) -> None:
    """`write(file)` into `.NAME.partial`, then renamed to `path`: a reader never sees half a file, an earlier file
    survives a crash. A full disk (under torch's RuntimeError too) is raised as the OSError naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:  # a Python file: torch's own writer of a path loses the errno of a full disk
            write(f)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e)
        if full is not None:
            raise OSError(full.errno, os.strerror(full.errno), str(path)) from e
        raise


def save_result(path: str | Path, result: dict) -> Path:
    """The result as `path` (.pt, with probabilities) and its metrics as `path` with `.json`."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"--output {path}: name the .pt file of probabilities; the metrics JSON goes beside it")
    atomic_write(path, lambda f: torch.save(result, f))
    summary = {k: v for k, v in result.items() if k not in ("ids", "labels", "probs", "classes")}
    summary["num_classes"] = len(result["classes"])
    atomic_write(path.with_suffix(".json"), lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    return path


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such result file (written by `resnet evaluate --output`)")
    try:
        result = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: torch raises pickle, zip and runtime errors alike
        raise ValueError(f"{path}: not a `resnet evaluate` result file ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"{path}: not a `resnet evaluate` result file (missing {', '.join(missing)})")
    expected = (len(result["ids"]), len(result["classes"]))
    if tuple(result["probs"].shape) != expected or result["labels"].shape != (expected[0],):
        raise ValueError(f"{path}: probs {tuple(result['probs'].shape)} / labels {tuple(result['labels'].shape)} do not match {expected[0]} ids x {expected[1]} classes")
    return result


def check_compatible(paths: Sequence[str | Path], results: Sequence[dict]) -> None:
    """Ensembles average rows: the files must hold the same images in the same order, with the same labels."""
    ref_path, ref = paths[0], results[0]
    for path, res in zip(paths[1:], results[1:]):
        if res["classes"] != ref["classes"]:
            raise ValueError(f"{ref_path} and {path} use different label sets ({len(ref['classes'])} vs {len(res['classes'])} classes, or another order)")
        if res["ids"] != ref["ids"]:
            only = sorted(set(ref["ids"]) ^ set(res["ids"]))
            detail = f"e.g. {only[0]} is in one only" if only else "same images in another order"
            raise ValueError(f"{ref_path} and {path} do not cover the same images in the same order ({len(ref['ids'])} vs {len(res['ids'])} images; {detail})")
        if not torch.equal(res["labels"], ref["labels"]):
            raise ValueError(f"{ref_path} and {path} give the same images different labels")


def console() -> Console:
    """Rich console; 100 columns when the output is a log file or pipe (rich's default there is 80, too narrow
    for a results table)."""
    return Console(width=None if sys.stdout.isatty() else 100)


def results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("model", "protocol", "views", "top-1 err.", "top-5 err.", "images"):
        table.add_column(col, justify="left" if col in ("model", "protocol") else "right", no_wrap=col in ("model", "protocol"))
    for r in rows:
        table.add_row(r["model"], r["protocol"], str(r["views"]), f"{r['top1_err']:.2f}", f"{r['top5_err']:.2f}", str(r["images"]))
    return table


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | protocol | views | top-1 err. (%) | top-5 err. (%) | images |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['protocol']} | {r['views']} | {r['top1_err']:.2f} | {r['top5_err']:.2f} | {r['images']} |" for r in rows]
    return "\n".join(lines) + "\n"


def ensemble(files: list[str], weights: Optional[list[float]] = None, output: Optional[str] = None) -> dict:
    """Average the saved class probabilities of several evaluations (weighted if `weights`), and print one row
    per model and one for the ensemble, as in He et al. 2015, Table 5.

    Args:
        files: result files of `resnet evaluate --output`.
        weights: one non-negative weight per file (default: all equal).
        output: Markdown table to write; the same rows also go to the `.json` beside it.
    """
    if len(files) < 2:
        raise ValueError(f"an ensemble needs at least two result files, got {len(files)}")
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    if len(weights) != len(files) or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights {weights}: expected {len(files)} non-negative numbers, not all 0")
    results = [load_result(f) for f in files]
    check_compatible(files, results)
    labels = results[0]["labels"]
    # A model's own row: the numbers `resnet evaluate` computed in float32 and saved (the file's float16
    # probabilities can tie where float32 did not); the ensemble's: from the saved float16 probabilities.
    metric_keys = ("images", "acc1", "top1_err", "acc5", "top5_err")
    rows = [
        {"model": r["model"], "protocol": r["protocol"], "views": r["views"],
         **({k: r[k] for k in metric_keys} if all(k in r for k in metric_keys) else topk_accuracy(r["probs"], labels))}
        for r in results
    ]
    mean = sum(w * r["probs"].float() for w, r in zip(weights, results)) / sum(weights)
    protocols = sorted({r["protocol"] for r in results})
    label = "ensemble" + ("" if len(set(weights)) == 1 else f" (weights {','.join(f'{w:g}' for w in weights)})")
    rows.append({"model": f"{label} of {len(files)}", "protocol": "+".join(protocols), "views": sum(r["views"] for r in results), **topk_accuracy(mean, labels)})
    console().print(results_table(rows, "Single models and their ensemble (errors in %)"))
    if output:
        out = Path(output)
        if out.suffix == ".json":
            raise ValueError(f"--output {out}: name the Markdown table (e.g. ensemble.md); the JSON goes beside it")
        atomic_write(out, lambda f: f.write(markdown_table(rows).encode()))
        record = {"files": [str(f) for f in files], "weights": weights, "rows": rows}
        atomic_write(out.with_suffix(".json"), lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        console().print(f"wrote {out} and {out.with_suffix('.json')}")
    return {"rows": rows, "probs": mean, "wandb_runs": [r.get("wandb_run") or {} for r in results]}
