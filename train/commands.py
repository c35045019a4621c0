"""The `resnet` commands: each with one line for `resnet --help` (the subcommands of `prepare` and `bench` as
"module:function", imported only when run), and the one option spelling of all of them."""

from __future__ import annotations

import importlib
import re
import sys


def underscore_options(args: list[str]) -> list[str]:
    """`--train-tar` and `--train_tar`, `--trainer.max-epochs` and `--trainer.max_epochs`: option names are Python
    identifiers underneath; every command accepts both spellings."""
    end = args.index("--") if "--" in args else len(args)  # after a bare `--`: arguments, not options
    return [re.sub(r"^--[a-z0-9_.-]+", lambda m: m.group(0)[:2] + m.group(0)[2:].replace("-", "_"), a)
            for a in args[:end]] + args[end:]


# Options renamed when each backend's options moved under its name (datamodules/backends): the old spelling still
# runs, with a note, so that a requeued job's command line or an sbatch script written before keeps working.
RENAMED = {"--data.dali_device": "--data.dali.device", "--data.ffcv_dir": "--data.ffcv.dir",
           "--data.ffcv_order": "--data.ffcv.order", "--data.ffcv_os_cache": "--data.ffcv.os_cache"}


def renamed_options(args: list[str]) -> list[str]:
    """`args` (underscored already) with RENAMED's old option names replaced, each named once on stderr."""
    end = args.index("--") if "--" in args else len(args)
    out = []
    for a in args[:end]:
        name, sep, value = a.partition("=")
        if name in RENAMED:
            print(f"resnet: {name} is now {RENAMED[name]}", file=sys.stderr)
            a = RENAMED[name] + sep + value
        out.append(a)
    return out + args[end:]


def renamed_keys(config):
    """A loaded YAML value with RENAMED's old keys moved to the new place, each named once on stderr: a whole config
    (`data: {dali_device: gpu}`, e.g. an earlier run's saved config.yaml) or a `--data` file (`dali_device: gpu`).
    Anything else is returned as it is."""
    if not isinstance(config, dict):
        return config
    data = config["data"] if isinstance(config.get("data"), dict) else config
    for old, new in RENAMED.items():
        old_key, (group, key) = old.removeprefix("--data."), new.removeprefix("--data.").split(".")
        if old_key in data and (data.get(group) is None or isinstance(data.get(group), dict)):
            value, given = data.pop(old_key), data.get(group) or {}
            if key in given:  # both spellings: the new one wins
                print(f"resnet: config key data.{old_key} ignored: data.{group}.{key} is given too", file=sys.stderr)
                continue
            print(f"resnet: config key data.{old_key} is now data.{group}.{key}", file=sys.stderr)
            data[group] = {**given, key: value}
    return config


def read_renamed_keys() -> None:
    """Makes the command line's YAML reading (config files and option values, jsonargparse's loader) apply
    renamed_keys."""
    import yaml
    from jsonargparse import get_loader, set_loader

    load = get_loader("yaml")
    if not getattr(load, "renames_keys", False):
        def load_renamed(text: str):
            return renamed_keys(load(text))

        load_renamed.renames_keys = True  # type: ignore[attr-defined]
        set_loader("yaml", load_renamed, exceptions=(yaml.YAMLError,))


# `resnet prepare` and `resnet bench`: subcommand -> ("module:function", one line for `resnet --help`). Imported only
# when run (FFCV's numba, the benchmarks' modules).
PREPARE = {
    "demo": ("datamodules.demo:write_demo_dataset", "write the demo dataset: 6 texture classes, 960 train / 240 val JPEGs"),
    "imagenet": ("datamodules.prepare:prepare_imagenet",
                 "arrange the ILSVRC2012 tars (or a Kaggle copy) into train/<wnid>/ and val/<wnid>/"),
    "check": ("datamodules.dataset_check:check_dataset",
              "decode every image, report problems by path, write the manifest runs start from"),
    "ffcv": ("datamodules.ffcv_write:prepare_ffcv", "write train.beton and val.beton for --data.backend ffcv"),
}
BENCH = {
    "data": ("train.bench:bench_data", "loader throughput alone, each backend on the same JPEGs"),
    "model": ("train.bench:bench_model", "training-step ceiling on synthetic tensors (no loader)"),
    "fit": ("train.bench:bench_fit", "the whole training pipeline against that ceiling"),
    "eval": ("train.bench_eval:bench_eval", "evaluation images/s under each protocol"),
    "node": ("train.node_report:bench_node", "this machine's report: all of the above and the GPU tests (make gpu-check)"),
    "checkpoint": ("train.bench_checkpoint:bench_checkpoint", "the cost of a periodic checkpoint"),
    "start": ("train.bench_start:bench_start", "start-up time to the first step: folder scan against manifest"),
    "recipes": ("train.bench_recipes:bench_recipes", "images/s per training resolution, each recipe's estimated time"),
    "demo": ("train.bench_demo:bench_demo", "the demo's accuracy under other thread counts, CPU kernels and seeds"),
}


OPTIONAL_PACKAGES = {"ffcv", "nvidia", "cv2", "numba"}  # pyproject's ffcv and dali extras


def functions(registry: dict[str, tuple[str, str]]) -> dict:
    functions = {}
    for name, (target, _) in registry.items():
        module, function = target.split(":")
        try:
            functions[name] = getattr(importlib.import_module(module), function)
        except ImportError as e:  # an optional extra not installed: the other subcommands still work
            if (e.name or "").split(".")[0] not in OPTIONAL_PACKAGES:
                raise
    return functions


# Every command, one line each: `resnet --help`.
COMMANDS = {
    "fit": "train: --config configs/imagenet_r50.yaml (a recipe on top: configs/recipes/*.yaml)",
    "validate": "val top-1 / top-5 of a checkpoint (--ckpt_path) under its training config",
    "evaluate": "the ILSVRC protocols on val (center, 10crop, multiscale) for a checkpoint or torchvision weights",
    "ensemble": "average the class probabilities of several `resnet evaluate --output` files",
    "predict": "top-5 classes with names and probabilities of image files or folders, as CSV or JSON",
    "prepare": PREPARE,
    "bench": BENCH,
}


def overview() -> str:
    """`resnet --help`: every command and subcommand with one line, and the option spelling."""
    lines = ["usage: resnet COMMAND [options]      resnet COMMAND --help: the options of one command", "", "commands:"]
    for name, what in COMMANDS.items():
        if isinstance(what, dict):
            lines += [f"  {name + ' ' + sub:<19} {line}" for sub, (_, line) in what.items()]
        else:
            lines.append(f"  {name:<19} {what}")
    lines += ["", "Options: --a_b or --a-b alike; nested settings with dots (--data.batch_size 256); --config FILE.yaml",
              "sets many at once (later options override it). Recipes and the cluster scripts: README.md."]
    return "\n".join(lines)
