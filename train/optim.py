"""Optimizer pieces as plain functions: weight-decay groups, linear lr scaling, the per-step lr factor, the
optimizer by name (SGD, or timm's LARS)."""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

Schedule = Literal["step", "cosine", "linear", "poly"]


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: weights of convolutions and linear layers decay; tensors of rank <= 1 (every BatchNorm weight
    and bias, `downsample.1` included, and all biases such as `fc.bias`) do not, unless `decay_norm_and_bias`
    (torchvision's V1 recipe and He et al. decay every parameter). Chosen by rank, not by name. With LARS, the
    group without decay also keeps its plain lr (no trust ratio), as in MLPerf's reference."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_norm_and_bias else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    groups: Iterable[dict],
    name: Literal["sgd", "lars"],
    *,
    lr: float,
    momentum: float,
    nesterov: bool = False,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """SGD with momentum, or LARS (You et al. 2017; timm.optim.Lars): SGD whose update of each decayed tensor is
    scaled by `trust_coefficient x ||w|| / (||g|| + weight_decay x ||w||)`."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, nesterov=nesterov, trust_coeff=trust_coefficient)
    raise ValueError(f"model.optimizer={name!r}: expected sgd or lars")


def scaled_lr(lr_per_256: float, batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr = lr_per_256 x global batch / 256."""
    return lr_per_256 * batch_size / 256


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    schedule: Schedule = "step",
    milestones: Sequence[float] = (30, 60, 80),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.0,
    end_factor: float = 0.0,
    power: float = 2.0,
) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Warmup: linear over `warmup_epochs` from `warmup_start_factor` to 1, reached by its last step (step k of W has
    `s + (1 - s) (k + 1) / W`). Then, with p the fraction of the steps after warmup done (0 to 1 at `total_steps`):
    - `step`: x`gamma` at each of `milestones` (epochs);
    - `cosine`: `end + (1 - end) (1 + cos(pi p)) / 2`;
    - `linear`: `1 - (1 - end) p` (FFCV's ResNet recipes: a linear ramp up, then down to 0 at the last epoch);
    - `poly`: `end + (1 - end) (1 - p)^power` (MLPerf's LARS recipe: power 2, end lr 1e-4).
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * min(1.0, (step + 1) / warmup_steps)
    if schedule == "step":
        return gamma ** sum(step / steps_per_epoch >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "poly":
        decay = (1.0 - progress) ** power
    else:
        raise ValueError(f"model.lr_schedule={schedule!r}: expected step, cosine, linear or poly")
    return end_factor + (1.0 - end_factor) * decay
