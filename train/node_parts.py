"""The parts of `resnet bench node` (train/node_report.py): each part of the training and evaluation path timed on
its own, one row per measurement (training-step ceiling, full pipeline per loader backend, loaders alone,
evaluation protocols, Lightning's overhead, the GPU tests). A row that cannot run is `skipped` or `failed` with
its reason; the next one runs all the same."""

from __future__ import annotations

import faulthandler
import gc
import importlib.util
import itertools
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.markup import escape

from datamodules import backends
from datamodules.transforms import PAPER_SCALES
from train import bench, bench_eval
from train.model import ImageNetClassifier
from train.networks import build_resnet
from train.optim import param_groups, scaled_lr
from train.results import console

REPO = Path(__file__).resolve().parent.parent
RECIPE = "configs/imagenet_r50.yaml"  # the `fit` and `overhead` parts' recipe: ImageNet ResNet-50
PARTS = ("ceiling", "fit", "data", "eval", "overhead", "gpu_tests")  # gpu_tests: train/node_gpu_tests.py
Part = Literal["ceiling", "fit", "data", "eval", "overhead", "gpu_tests"]
Layout = Literal["channels_last", "nchw"]
BackendName = backends.BackendName


class Skipped(Exception):
    """A part this machine cannot run (no GPU, an optional package absent): a skipped row, not a failure."""


@dataclass
class Sizes:
    """What the parts measure, resolved for the machine (see bench_node for each field's meaning)."""

    accelerator: str
    models: list[str]
    layouts: list[str]
    compiled_models: list[str]
    compiled_layouts: list[str]
    backends: list[str]
    protocols: list[str]
    batch_size: int
    crop_size: int
    precision: str
    steps: int
    warmup_steps: int
    num_workers: int
    eval_arch: str
    eval_batch_size: int
    val_per_class: int
    fit_compile: bool
    root: Optional[str] = None
    images_per_class: int = field(init=False)

    def __post_init__(self) -> None:
        # Every timed step sees new images: warm-up + timed steps, one batch to spare, over 6 classes.
        self.images_per_class = math.ceil((self.warmup_steps + self.steps + 1) * self.batch_size / 6)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (nvidia) is absent
        return False


# No row may hang the command: past this, faulthandler prints every thread's stack and ends the process (a loader
# blocked inside DALI or FFCV never returns to Python, so no exception could stop it). The report then holds the
# parts finished before (node_report.py writes it after each part).
ROW_LIMIT_S = 900


def measure_row(part: str, name: str, config: dict, measure: Callable[[], dict], limit_s: int = ROW_LIMIT_S) -> dict:
    """Runs one measurement: status `ok` with its fields, `skipped` (Skipped) or `failed` (any other exception,
    its type and message as the reason); seconds of wall time and, on a GPU, the peak memory torch allocated.
    A measurement still running after `limit_s` seconds ends the process (stacks printed to stderr)."""
    row = {"part": part, "name": name, "config": config, "status": "ok", "reason": "", "images_per_sec": None,
           "peak_gpu_mem_gib": None, "seconds": 0.0}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # The process's own stderr (file descriptor 2), also where sys.stderr is replaced (a test's capture).
    faulthandler.dump_traceback_later(limit_s, exit=True, file=sys.__stderr__)
    try:
        row.update(measure())
    except Skipped as e:
        row.update(status="skipped", reason=str(e))
    except (Exception, SystemExit) as e:  # SystemExit: a command-line parse error inside build_cli
        row.update(status="failed", reason=f"{type(e).__name__}: {e}".strip())
        traceback.print_exc()
    finally:
        faulthandler.cancel_dump_traceback_later()
    row["seconds"] = time.perf_counter() - start
    rate = row["images_per_sec"]
    if row["status"] == "ok" and rate is not None and not (math.isfinite(rate) and rate > 0):
        row.update(status="failed", reason=f"images_per_sec = {rate}: not a positive number", images_per_sec=None)
    if cuda:
        if row["status"] == "ok" and part != "gpu_tests":  # the GPU tests allocate in processes of their own
            row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        gc.collect()
        torch.cuda.empty_cache()  # the next part (or the GPU tests' processes) gets the memory back
    shown = f"{rate:.1f} images/s" if row["status"] == "ok" and rate else row["reason"] or row["status"]
    console().print(escape(f"[{part}] {name}: {row['status']} ({shown}, {row['seconds']:.1f} s)"))
    return row


def _ceiling_config(s: Sizes, arch: str, channels_last: bool, compile: bool) -> dict:
    return {"arch": arch, "batch_size": s.batch_size, "crop_size": s.crop_size, "precision": s.precision,
            "channels_last": channels_last, "compile": compile, "accelerator": s.accelerator}


def _config_name(c: dict) -> str:
    layout = "channels_last" if c["channels_last"] else "NCHW"
    return (f"{c['arch']} {layout} {'compiled' if c['compile'] else 'eager'}, batch {c['batch_size']}, "
            f"{c['crop_size']}px, {c['precision']}")


def _ceiling_row(s: Sizes, config: dict) -> dict:
    def measure() -> dict:
        if config["compile"]:
            torch._dynamo.reset()  # each compiled row compiles afresh, never into an earlier row's cache limit
        rate = bench.bench_model(config["arch"], config["batch_size"], config["crop_size"], config["precision"],
                                 config["channels_last"], steps=s.steps, warmup_steps=s.warmup_steps,
                                 accelerator=config["accelerator"], compile=config["compile"])
        return {"images_per_sec": rate}

    return measure_row("ceiling", _config_name(config), config, measure)


def ceiling_rows(s: Sizes) -> list[dict]:
    """Training-step images/s on synthetic tensors already on the device (bench_model): every model in every
    layout eager, then the compiled ones."""
    rows = [_ceiling_row(s, _ceiling_config(s, arch, layout == "channels_last", False))
            for arch in s.models for layout in s.layouts]
    rows += [_ceiling_row(s, _ceiling_config(s, arch, layout == "channels_last", True))
             for arch in s.compiled_models for layout in s.compiled_layouts]
    if s.accelerator == "cpu" and not s.compiled_models:
        config = _ceiling_config(s, "resnet50", True, True)

        def skip() -> dict:
            raise Skipped("torch.compile rows are measured on a GPU by default (compiling takes minutes on a CPU); "
                          "--compiled_models '[resnet50]' measures them here")

        rows.append(measure_row("ceiling", _config_name(config), config, skip))
    return rows


def _need_backend(backend: str) -> None:
    kind = backends.BACKENDS[backend]
    if not kind.available():
        raise Skipped(f"{kind.requires} not installed ({kind.install})")


def _ffcv_ready(s: Sizes, root: str) -> None:
    """The .beton files: written for the generated images; for --root they must exist (for ImageNet, writing them
    takes hours: not a benchmark's side effect)."""
    if s.root is None:
        bench.ensure_ffcv(root)
    elif not (Path(root) / "ffcv/train.beton").is_file():
        raise Skipped(f"no {root}/ffcv/train.beton: write it first with `resnet prepare ffcv --root {root}`")


def _classes(root: str, split: str) -> int:
    return sum(1 for d in (Path(root) / split).iterdir() if d.is_dir())


def _dali_note(s: Sizes, backend: str) -> str:
    if backend != "dali":
        return ""
    return " (nvJPEG decode on the GPU)" if s.accelerator == "gpu" else " (DALI's CPU pipeline: no GPU)"


def fit_rows(s: Sizes, dataset: Callable[[], str], ceilings: list[dict]) -> list[dict]:
    """The full training pipeline per backend (bench.fit_rate on RECIPE), and its share of the synthetic ceiling
    of the same model, batch, crop, precision, layout and compilation: a ceiling row's when one matches, else
    measured here."""
    rows = []
    for backend in s.backends:
        config = {"recipe": RECIPE, "backend": backend, "num_workers": s.num_workers, "batch_size": s.batch_size,
                  "crop_size": s.crop_size, "precision": s.precision, "compile": s.fit_compile, "accelerator": s.accelerator}
        if backend == "dali":
            config["dali.device"] = s.accelerator

        def measure(backend=backend, config=config) -> dict:
            _need_backend(backend)
            root = dataset()
            if backend == "ffcv":
                _ffcv_ready(s, root)
            overrides = ["--data.root", root, "--model.num_classes", str(_classes(root, "train")), "--data.backend", backend,
                         "--data.num_workers", str(s.num_workers), "--data.batch_size", str(s.batch_size),
                         "--data.crop_size", str(s.crop_size), "--trainer.precision", s.precision,
                         "--model.compile", str(s.fit_compile).lower(), "--trainer.accelerator", s.accelerator,
                         "--data.dali.device", s.accelerator, "--trainer.enable_model_summary", "false"]
            if s.fit_compile:
                torch._dynamo.reset()  # a fresh compilation, as in a new `resnet fit` process
            fit = bench.fit_rate(str(REPO / RECIPE), s.steps, s.warmup_steps, overrides)
            return {"images_per_sec": fit["images_per_sec"], **_ceiling_of(s, fit, ceilings)}

        name = (f"{backend}{_dali_note(s, backend)}, {RECIPE} (resnet50), batch {s.batch_size}, {s.crop_size}px, "
                f"{s.precision}{', compiled' if s.fit_compile else ''}, {s.num_workers} workers")
        rows.append(measure_row("fit", name, config, measure))
    return rows


def _ceiling_of(s: Sizes, fit: dict, ceilings: list[dict]) -> dict:
    key = {k: fit[k] for k in ("arch", "batch_size", "crop_size", "precision", "channels_last", "compile", "accelerator")}
    match = next((r for r in ceilings if r["status"] == "ok" and r["config"] == key), None)
    if match:
        rate, source = match["images_per_sec"], f"ceiling row: {match['name']}"
    else:
        rate = bench.bench_model(key["arch"], key["batch_size"], key["crop_size"], key["precision"], key["channels_last"],
                                 steps=s.steps, warmup_steps=s.warmup_steps, accelerator=key["accelerator"],
                                 compile=key["compile"])
        source = f"measured for this row: {_config_name(key)}"
    return {"ceiling_images_per_sec": rate, "ratio_to_ceiling": fit["images_per_sec"] / rate, "ceiling_source": source,
            "fit_config": {**key, "backend": fit["backend"], "num_workers": fit["num_workers"]}}


def data_rows(s: Sizes, dataset: Callable[[], str]) -> list[dict]:
    """Each backend's training loader alone (bench.loader_rate), with the CPUs of the machine as workers; on a GPU
    each batch is copied and normalised there, and DALI decodes with nvJPEG."""
    rows = []
    for backend in s.backends:
        config = {"backend": backend, "batch_size": s.batch_size, "crop_size": s.crop_size, "num_workers": s.num_workers,
                  "accelerator": s.accelerator, "warmup_batches": s.warmup_steps, "batches": s.steps}

        def measure(backend=backend) -> dict:
            _need_backend(backend)
            root = dataset()
            if backend == "ffcv":
                _ffcv_ready(s, root)
            rate = bench.loader_rate(root, backend, batch_size=s.batch_size, num_workers=s.num_workers,
                                     crop_size=s.crop_size, warmup_batches=s.warmup_steps, batches=s.steps,
                                     accelerator=s.accelerator)
            return {"images_per_sec": rate}

        name = f"{backend}{_dali_note(s, backend)}, batch {s.batch_size}, {s.crop_size}px, {s.num_workers} workers"
        rows.append(measure_row("data", name, config, measure))
    return rows


def eval_geometry(crop_size: int) -> dict:
    """The ILSVRC protocols' geometry scaled by crop_size/224 (resize 256, scales 224-640 at 224)."""
    scale = lambda px: max(32, round(px * crop_size / 224))
    return {"crop_size": crop_size, "resize_size": scale(256), "scales": [scale(p) for p in PAPER_SCALES]}


def eval_rows(s: Sizes, dataset: Callable[[], str]) -> list[dict]:
    """`resnet evaluate` under each protocol (bench_eval.eval_rate), a randomly initialised network (speed does not
    depend on the weights), on the generated val/ images."""
    geometry = eval_geometry(s.crop_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{s.eval_arch}.pth"
        for protocol in s.protocols:
            config = {"arch": s.eval_arch, "protocol": protocol, "batch_size": s.eval_batch_size,
                      "accelerator": s.accelerator, **geometry}

            def measure(protocol=protocol) -> dict:
                root = dataset()
                if not weights.is_file():
                    torch.save(build_resnet(s.eval_arch, num_classes=_classes(root, "val")).state_dict(), weights)
                result = bench_eval.eval_rate(str(weights), root, protocol, batch_size=s.eval_batch_size, num_workers=None,
                                         accelerator=s.accelerator, **geometry)
                return {k: result[k] for k in ("images_per_sec", "views", "views_detail", "images", "precision")}

            views = (f"scales {','.join(map(str, geometry['scales']))}" if protocol == "multiscale"
                     else f"resize {geometry['resize_size']}, crop {geometry['crop_size']}")
            name = f"{protocol}, {s.eval_arch}, {views}, batch {s.eval_batch_size}"
            rows.append(measure_row("eval", name, config, measure))
    return rows


class _SameBatch:
    """One batch already on the device, `count` times: a training loop's cost without any loader."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], count: int):
        self.batch, self.count = batch, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return itertools.repeat(self.batch, self.count)


def _raw_rate(module: ImageNetClassifier, batch: tuple, precision: str, steps: int, warmup_steps: int) -> float:
    """Images/s of a plain PyTorch loop (forward, loss, backward, SGD step, zero_grad) over one on-device batch,
    with the module's network, loss and optimizer groups; synced at the two ends of the timed window only."""
    x, y = batch
    cuda = x.device.type == "cuda"
    hp = module.hparams
    opt = torch.optim.SGD(param_groups(module.net, hp.weight_decay), lr=scaled_lr(hp.lr_per_256, x.shape[0]),
                          momentum=hp.momentum)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.criterion(module(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - start)


def _lightning_rate(config: dict, batch: tuple, steps: int, warmup_steps: int) -> float:
    """Images/s of `Trainer.fit` as `resnet fit` builds it (RECIPE through build_cli: its callbacks, ImagesPerSecond
    among them), on the same on-device batch; logger, progress bar and checkpointing off."""
    with tempfile.TemporaryDirectory() as run_dir:
        cli = bench.fit_cli([
            "--config", str(REPO / RECIPE), "--model.arch", config["arch"], "--data.batch_size", str(config["batch_size"]),
            "--data.crop_size", str(config["crop_size"]), "--trainer.precision", config["precision"],
            "--model.channels_last", str(config["channels_last"]).lower(), "--model.compile", str(config["compile"]).lower(),
            "--trainer.accelerator", config["accelerator"], "--trainer.devices", "1",
            "--trainer.max_steps", str(steps + warmup_steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", run_dir,
        ])
        timer = bench.StepTimer(warmup_steps, steps)
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [timer]
        cli.trainer.fit(cli.model, train_dataloaders=_SameBatch(batch, steps + warmup_steps))
    if timer.rate is None:
        raise RuntimeError(f"Trainer.fit stopped after {cli.trainer.global_step} of {steps + warmup_steps} steps")
    return timer.rate


def overhead_row(s: Sizes) -> dict:
    """Lightning's cost against a raw PyTorch loop: same model, batch, precision and layout, one batch reused on
    the device. overhead_pct = 100 x (1 - lightning / raw); it includes the module's metric updates and logging."""
    config = _ceiling_config(s, "resnet50", True, s.fit_compile)

    def measure() -> dict:
        device = torch.device("cuda" if s.accelerator == "gpu" else "cpu")
        x = torch.randn(s.batch_size, 3, s.crop_size, s.crop_size, device=device)
        batch = (x.contiguous(memory_format=torch.channels_last), torch.randint(0, 1000, (s.batch_size,), device=device))
        module = ImageNetClassifier("resnet50", num_classes=1000, channels_last=True, compile=s.fit_compile,
                                    batch_size=s.batch_size)
        if s.fit_compile:
            torch._dynamo.reset()
        module.configure_model()  # compiles the network when fit_compile, as Lightning's setup does
        raw = _raw_rate(module.to(device), batch, s.precision, s.steps, s.warmup_steps)
        del module
        lightning = _lightning_rate(config, batch, s.steps, s.warmup_steps)
        return {"images_per_sec": lightning, "raw_images_per_sec": raw, "lightning_images_per_sec": lightning,
                "overhead_pct": 100 * (1 - lightning / raw)}

    return measure_row("overhead", f"Trainer.fit vs raw loop: {_config_name(config)}", config, measure)
