"""Optimizers and learning-rate schedules shared by both parties and every mode."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hosl.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adamw")
SCHEDULES = ("constant", "linear")


def build_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total_steps: int, schedule: str) -> float:
    """Multiplier on the base learning rate at `step` (0-based)."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / max(1, total_steps))
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, schedule)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule)
    )
