"""Numerical checks of LoRaD's properties (WaDi §3.2), one row each, for notebook 02.

The properties are listed in ``docs/paper_notes.md#lorad-properties``. Each check returns the measured quantity,
what it should be, and whether it holds; the unit tests assert the same properties on their own
(``tests/test_adapters.py``).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .inject import count_trainable
from .lorad import LoRaDLinear, lorad_rotate


def _pairs(weight: torch.Tensor) -> torch.Tensor:
    return weight.view(weight.shape[0], -1, 2)  # (out, in/2, 2): column pairs (2j, 2j+1)


def _rotate_input_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each input pair (x_2j, x_2j+1) by −angles_j (what a shared, row-independent Θ amounts to)."""
    pairs = x.view(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos(), angles.sin()
    first = pairs[..., 0] * cos + pairs[..., 1] * sin
    second = -pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack([first, second], dim=-1).flatten(-2)


def check_lorad_properties(base: nn.Linear, rank: int, seed: int = 0, angle_scale: float = 0.5) -> pd.DataFrame:
    """Check LoRaD's properties on a copy of ``base`` with rank ``rank`` (float64 for exact comparisons).

    Args:
        base: a Linear with an even ``in_features`` (e.g. a teacher layer); it is copied, not changed.
        rank: LoRaD rank r.
        angle_scale: standard deviation of the random ``theta_a`` entries used for the non-identity checks.
    """
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        linear.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
    with torch.random.fork_rng(devices=[]):  # B's Xavier init draws from the global RNG: seed it, leave it as it was
        torch.manual_seed(seed)
        layer = LoRaDLinear(linear, rank, name="check")
    weight = linear.weight.detach().clone()
    x = torch.randn(16, base.in_features, generator=generator, dtype=torch.float64)
    rows = []

    def record(name: str, measured: float, expected: str, holds: bool) -> None:
        rows.append({"property": name, "measured": measured, "expected": expected, "holds": bool(holds)})

    # 1. Identity at init, and the first gradient reaches A only.
    identity_error = (layer(x) - linear(x)).abs().max().item()
    record("identity at init: max |y_LoRaD − y_Linear|", identity_error, "0", identity_error == 0.0)
    layer(x).square().sum().backward()
    grad_a, grad_b = layer.theta_a.grad.abs().max().item(), layer.theta_b.grad.abs().max().item()
    record(
        "gradient at init reaches theta_b: max |∂L/∂B|", grad_b, "0 (only A moves first)", grad_b == 0.0 and grad_a > 0
    )

    # 2. Norms under random angles.
    with torch.no_grad():
        layer.theta_a.copy_(angle_scale * torch.randn(layer.theta_a.shape, generator=generator, dtype=torch.float64))
    rotated = layer.rotated_weight().detach()
    row_error = ((rotated.norm(dim=1) - weight.norm(dim=1)).abs() / weight.norm(dim=1)).max().item()
    pair_error = (_pairs(rotated).norm(dim=-1) - _pairs(weight).norm(dim=-1)).abs().max().item()
    record("row norms kept: max relative change", row_error, "< 1e-12", row_error < 1e-12)
    record("pair norms kept: max |change|", pair_error, "< 1e-12", pair_error < 1e-12)
    column_change = ((rotated.norm(dim=0) - weight.norm(dim=0)).abs() / weight.norm(dim=0)).max().item()
    record("column norms are NOT kept: max relative change", column_change, "> 0", column_change > 1e-6)

    # 3. The [−π, π) wrap changes no value: compare with the unwrapped rotation.
    theta = layer.theta_a.detach().double() @ layer.theta_b.detach().double()  # parameters are fp32
    cos, sin = theta.cos(), theta.sin()
    u, v = _pairs(weight).unbind(-1)
    unwrapped = torch.stack([u * cos - v * sin, u * sin + v * cos], dim=-1).flatten(1)
    wrap_error = (unwrapped - rotated).abs().max().item()
    record("wrap into [−π, π) is a no-op: max |difference|", wrap_error, "< 1e-12", wrap_error < 1e-12)

    # 4. Shared angles (identical rows of Θ) = a rotation of the input pairs (OFT, block size 2); LoRaD's
    #    per-row angles are not.
    shared = theta.mean(dim=0)
    y_shared = F.linear(x, lorad_rotate(weight, torch.ones(weight.shape[0], 1, dtype=torch.float64), shared[None]))
    oft_error = (y_shared - F.linear(_rotate_input_pairs(x, shared), weight)).abs().max().item()
    record("identical rows of Θ = input-pair rotation (OFT b=2): max |difference|", oft_error, "< 1e-12",
           oft_error < 1e-12)
    y_lorad = F.linear(x, rotated)
    best_shared = F.linear(_rotate_input_pairs(x, shared), weight)
    gap = ((y_lorad - best_shared).norm() / (y_lorad - F.linear(x, weight)).norm()).item()
    record("per-row Θ is not an input rotation: relative gap", gap, "> 0.1", gap > 0.1)

    # 5. Merge gives the adapted forward; unmerge restores W.
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        merged_error = (layer(x) - adapted).abs().max().item()
        layer.unmerge()
    restore_error = (linear.weight - weight).abs().max().item()
    record("merge = adapted forward: max |difference|", merged_error, "< 1e-10", merged_error < 1e-10)
    record("unmerge restores W: max |difference|", restore_error, "< 1e-12", restore_error < 1e-12)

    # 6. The custom autograd Function's gradients equal naive autograd through the materialised W'.
    for parameter in (layer.theta_a, layer.theta_b):
        parameter.grad = None
    layer(x).sin().sum().backward()
    a = layer.theta_a.detach().clone().requires_grad_(True)
    b = layer.theta_b.detach().clone().requires_grad_(True)
    F.linear(x, lorad_rotate(weight, a, b), linear.bias).sin().sum().backward()
    grad_error = max(
        (layer.theta_a.grad - a.grad).abs().max().item(), (layer.theta_b.grad - b.grad).abs().max().item()
    )
    record("custom backward = naive autograd: max |Δ grad|", grad_error, "< 1e-10", grad_error < 1e-10)

    # 7. Parameter count r·(out + in/2).
    expected = rank * (base.out_features + base.in_features // 2)
    record(f"trainable parameters = r·(out + in/2) = {expected}", count_trainable(layer), str(expected),
           count_trainable(layer) == expected)
    return pd.DataFrame(rows)
