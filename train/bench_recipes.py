"""`resnet bench recipes`: training-step images/s of a model at each training resolution of the recipes (160, 176,
192, 224), and each recipe's estimated time on `gpus` devices like this one: the sum over its epochs of ImageNet's
1,281,167 images / (gpus x images/s at that epoch's resolution). An estimate from the model's ceiling (synthetic
tensors, no loader, no validation, perfect scaling over devices, plain torchvision ResNets: the FFCV recipes'
BlurPool costs more): a lower bound on the real time. MLPerf's counts all its epochs (a run stops once it reaches
75.9 %)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from rich.table import Table

from datamodules.transforms import ProgressiveResizing
from train.bench import bench_model, console
from train.networks import Arch

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 1_281_167


def recipe_resolutions(path: Path) -> list[int]:
    """The training crop side of each epoch of a recipe (configs/recipes/*.yaml on top of imagenet_r50.yaml)."""
    base = yaml.safe_load((REPO / "configs/imagenet_r50.yaml").read_text())
    recipe = yaml.safe_load(path.read_text())
    epochs = recipe.get("trainer", {}).get("max_epochs", base["trainer"]["max_epochs"])
    data = recipe.get("data", {})
    if data.get("progressive_resizing"):
        schedule = ProgressiveResizing(**data["progressive_resizing"])
        return [schedule.at(e) for e in range(epochs)]
    return [data.get("crop_size", 224)] * epochs


def estimate_hours(rates: dict[int, float], gpus: int) -> dict[str, dict]:
    """{recipe: {"epochs", "sides", "hours"}} from images/s of one device per training side ({side: rate}); a side
    not in `rates` takes the nearest measured one's rate scaled by the pixel ratio."""

    def rate_at(side: int) -> float:
        nearest = min(rates, key=lambda s: abs(s - side))
        return rates[nearest] * (nearest / side) ** 2

    recipes = {}
    for path in sorted((REPO / "configs/recipes").glob("*.yaml")):
        sides = recipe_resolutions(path)
        hours = sum(TRAIN_IMAGES / (gpus * rate_at(s)) for s in sides) / 3600
        recipes[path.stem] = {"epochs": len(sides), "sides": sorted(set(sides)), "hours": hours}
    return recipes


def bench_recipes(
    arch: Arch = "resnet50",
    sizes: list[int] = [160, 176, 192, 224],
    batch_size: int = 256,
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "bf16-mixed",
    steps: int = 20,
    warmup_steps: int = 5,
    gpus: int = 8,
    accelerator: Literal["auto", "cpu", "gpu"] = "auto",
    output: Optional[str] = None,
) -> dict:
    """Images/s per training resolution and each recipe's estimated training time.

    Args:
        arch: network depth (the recipes are ResNet-50's).
        sizes: training crop sides measured; a recipe using another side is estimated from the nearest one's
            images/s scaled by the pixel ratio.
        batch_size: images per step (one device).
        precision: `bf16-mixed` (the recipes'), `16-mixed` or `32-true` (on a CPU).
        steps: steps timed per side.
        warmup_steps: steps before timing.
        gpus: devices the estimate assumes (8: the recipes' published set-ups).
        accelerator: `cpu`, `gpu` or `auto`.
        output: a JSON file for the result.
    """
    rates = {size: bench_model(arch, batch_size=batch_size, crop_size=size, precision=precision, steps=steps,
                               warmup_steps=warmup_steps, accelerator=accelerator) for size in sizes}
    recipes = estimate_hours(rates, gpus)
    table = Table(title=f"{arch}, {precision}, batch {batch_size} a device: estimated training time on {gpus} devices")
    for column in ("recipe", "epochs", "training sides", "hours"):
        table.add_column(column, justify="right")
    for name, r in recipes.items():
        table.add_row(name, str(r["epochs"]), "/".join(map(str, r["sides"])), f"{r['hours']:.3g}")
    console().print(table)
    result = {"arch": arch, "precision": precision, "batch_size": batch_size, "gpus": gpus,
              "images_per_sec": {str(k): v for k, v in rates.items()}, "recipes": recipes}
    if output:
        Path(output).write_text(json.dumps(result, indent=1))
    return result
