"""Learning-rate schedule shared by the tiny-world trainers."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, steps: int, lr: float, lr_min: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr_min`` at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
