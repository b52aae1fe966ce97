"""Expressivity of LoRA, DoRA and LoRaD: how well each fits a pure *direction* change of a weight at a given
parameter budget (notebook 02; motivated by WaDi §1 / Fig. 1, where one-step students differ from their teachers
mainly in direction).

Each adapter wraps a frozen copy of the teacher weight; its parameters are fitted by Adam so that the adapted
weight matches a target, and the residual error left is reported against the adapter's parameter count.
"""

from __future__ import annotations

import math
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .dora import DoRALinear
from .inject import count_trainable
from .lora import LoRALinear
from .lorad import LoRaDLinear, lorad_rotate

ADAPTER_CLASSES = {
    "lora": LoRALinear,
    "dora": DoRALinear,
    "dora_frozen_norm": partial(DoRALinear, frozen_norm=True),
    "lorad": LoRaDLinear,
}


def mean_direction_change(weight: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over output rows of 1 − cos(w_i, w'_i).

    The DoRA-style direction change of Fig. 1(a), ``docs/paper_notes.md#analysis-definitions``.
    """
    return float((1 - F.cosine_similarity(weight.double(), other.double(), dim=1)).mean())


TARGET_KINDS = ("additive", "rotation")


def direction_residual_target(weight: torch.Tensor, kind: str, direction_change: float, rank_fraction: float,
                              seed: int) -> torch.Tensor:
    """A synthetic one-step-student weight: every row keeps its norm, its direction moves by a low-rank change.

    Two families, each the natural home of one adapter, both scaled (by bisection) so that
    :func:`mean_direction_change` equals ``direction_change`` (the paper measures 2.21 % for a fully
    fine-tuned one-step student), with rank k = ⌈rank_fraction · min(out, in)⌉ (WaDi: 30 % of the rank holds
    93 % of a real residual's energy):

    - ``"additive"``: W + s·U·V (U: out×k, V: k×in), rows renormalised to their old norms — LoRA/DoRA's family;
    - ``"rotation"``: W rotated by angles Θ = s·U·V (U: out×k, V: k×in/2) — LoRaD's family.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}")
    out_features, in_features = weight.shape
    rank = max(1, math.ceil(rank_fraction * min(out_features, in_features)))
    generator = torch.Generator().manual_seed(seed)
    base = weight.double()
    columns = in_features if kind == "additive" else in_features // 2
    left = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, columns, generator=generator, dtype=torch.float64) / math.sqrt(rank * columns)
    norms = base.norm(dim=1, keepdim=True)

    def target(scale: float) -> torch.Tensor:
        if kind == "rotation":
            return lorad_rotate(base, scale * left, right)
        moved = base + scale * norms * (left @ right)
        return moved * (norms / moved.norm(dim=1, keepdim=True))

    low, high = 0.0, 1.0
    while mean_direction_change(base, target(high)) < direction_change:
        high *= 2
    for _ in range(60):  # bisection: the direction change grows monotonically with the scale on this range
        middle = (low + high) / 2
        low, high = (middle, high) if mean_direction_change(base, target(middle)) < direction_change else (low, middle)
    return target((low + high) / 2).to(weight.dtype)


def student_direction_target(weight: torch.Tensor, student_weight: torch.Tensor) -> torch.Tensor:
    """The direction part of a real student's change: each row of ``student_weight`` scaled to the norm of the same
    row of ``weight``, the teacher's. What an adapter that changes directions only (LoRaD, WaDi §3.2) can at best
    fit of a trained one-step student (the "FT student" target of notebook 02)."""
    return F.normalize(student_weight, dim=1) * weight.norm(dim=1, keepdim=True)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight an adapted Linear applies, read off its forward on the identity (differentiable)."""
    base = layer.base_layer
    eye = torch.eye(base.in_features, dtype=base.weight.dtype)
    out = layer(eye)
    if base.bias is not None:
        out = out - base.bias
    return out.T


def fit_adapter(weight: torch.Tensor, target: torch.Tensor, method: str, rank: int, steps: int, lr: float,
                seed: int) -> dict:
    """Fit one adapter on a frozen ``weight`` to ``target``; return its parameter count and residual error.

    The error is relative to the change to explain: ‖W_adapted − W_target‖_F / ‖W − W_target‖_F (1 = no fit).
    """
    if method not in ADAPTER_CLASSES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ADAPTER_CLASSES)}")
    torch.manual_seed(seed)
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = ADAPTER_CLASSES[method](base, rank)
    parameters = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    scale = (weight - target).norm()
    for _ in range(steps):
        loss = ((effective_weight(layer) - target).norm() / scale) ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted = effective_weight(layer)
    return {
        "method": method,
        "rank": rank,
        "params": count_trainable(layer),
        "relative error": float((fitted - target).norm() / scale),
        "row-norm change": float(((fitted.norm(dim=1) - weight.norm(dim=1)).abs() / weight.norm(dim=1)).mean()),
    }


def expressivity_sweep(
    weights: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    methods: tuple[str, ...],
    ranks: tuple[int, ...],
    steps: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`fit_adapter` over layers × methods × ranks; one row per fit."""
    jobs = [(name, method, rank) for name in weights for method in methods for rank in ranks]
    rows = []
    for name, method, rank in tqdm(jobs, desc="fitting adapters", disable=not progress):
        rows.append({"layer": name, **fit_adapter(weights[name], targets[name], method, rank, steps, lr, seed)})
    return pd.DataFrame(rows)
