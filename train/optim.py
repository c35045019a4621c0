"""Optimizer pieces as plain functions: weight-decay groups, linear lr scaling, the per-step lr factor."""

from __future__ import annotations

import math
from typing import Literal, Sequence

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of convolutions and linear layers decay; tensors of rank <= 1 (every BatchNorm weight
    and bias, `downsample.1` included, and all biases such as `fc.bias`) do not. Chosen by rank, not by name."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(lr_per_256: float, batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr = lr_per_256 x global batch / 256."""
    return lr_per_256 * batch_size / 256


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    schedule: Literal["step", "cosine"] = "step",
    milestones: Sequence[float] = (30, 60, 80),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup over `warmup_epochs` (reaching 1 at
    its end), then ×gamma at each milestone epoch, or a cosine decay reaching 0 at `total_steps`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return min(1.0, (step + 1) / warmup_steps)
    epoch = step / steps_per_epoch
    if schedule == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
