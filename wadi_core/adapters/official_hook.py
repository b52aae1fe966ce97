"""The official WaDi training code's LoRaD forward hook, re-implemented faithfully as a cost baseline.

Official code: ``register_hooks`` in ``train_dkd_sd.py`` adds ``theta_a`` (out×r, zeros) and ``theta_b``
(r×in/2, Xavier-uniform) to every adapted ``nn.Linear`` and registers the forward hook ``hook_fn``, which
(``docs/paper_notes.md#lorad-definition``, ``docs/paper_notes.md#cost-of-the-official-hook``)

1. lets the frozen Linear compute ``x·Wᵀ + b`` and then discards that output,
2. rebuilds Θ = wrap(theta_a·theta_b) in fp32, materialises cos Θ and sin Θ and the full rotated weight W_rot
   (out×in), cast back to W's dtype,
3. returns ``F.linear(x, W_rot, b)``.

So every call runs the Linear twice, and autograd keeps Θ, cos, sin and W_rot (all O(out·in)) alive for
backward. The math is written out here as the official code does, not through
:func:`wadi_core.adapters.lorad_rotate`, because the point is to reproduce its cost
(the layer benchmark, ``python -m wadi_core.benchmarks layers``, compares it with
:class:`wadi_core.adapters.LoRaDLinear`).

Notation: ``theta_a`` → A, ``theta_b`` → B, ``theta`` → Θ = AB (the code's layout, the transpose of the
paper's d/2×k Θ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def official_lorad_hook(module: nn.Linear, inputs: tuple[Tensor, ...], _output: Tensor) -> Tensor:
    """Forward hook replacing a Linear's output with ``F.linear(x, W_rot, b)``, as the official code does.

    As ``hook_fn`` in ``train_dkd_sd.py``: pairing (2j, 2j+1), [−π, π) wrap, fp32 θ; the original output,
    ``_output``, has already been computed and is thrown away.

    Args:
        module: a Linear carrying ``theta_a`` (out×r) and ``theta_b`` (r×in/2) parameters.
        inputs: the Linear's positional inputs; ``inputs[0]`` is x (..., in).
        _output: the Linear's own output, discarded.

    Returns:
        x·W_rotᵀ + b with W_rot the rotation of W by Θ, in W's dtype.
    """
    weight = module.weight  # (out, in)
    theta = module.theta_a @ module.theta_b  # (out, in/2), fp32
    theta = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi  # wrap into [−π, π)
    cos, sin = torch.cos(theta), torch.sin(theta)
    w = weight.to(theta.dtype)
    w_odd, w_even = w[:, 0::2], w[:, 1::2]  # (out, in/2) each: the columns 2j and 2j+1
    rotated = torch.stack((w_odd * cos - w_even * sin, w_odd * sin + w_even * cos), dim=-1)  # (out, in/2, 2)
    w_rot = rotated.reshape(weight.shape).to(weight.dtype)  # (out, in), interleaved back as 2j, 2j+1
    return F.linear(inputs[0], w_rot, module.bias)


class OfficialHookLoRaD(nn.Module):
    """A frozen Linear adapted the official way: ``theta_a``/``theta_b`` on the Linear plus the forward hook.

    As ``register_hooks`` in ``train_dkd_sd.py`` sets it up. The parameters live on the wrapped Linear under the
    official names, so ``self.base.state_dict()`` has the ``weight``/``bias``/``theta_a``/``theta_b`` keys of
    the official training checkpoints. Identity at init (``theta_a`` = 0).

    Args:
        base: the Linear to adapt (frozen in place; ``in_features`` must be even).
        rank: r, the inner dimension of Θ = theta_a·theta_b.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if base.in_features % 2:
            raise ValueError(f"LoRaD pairs input columns (2j, 2j+1); in_features must be even, got {base.in_features}")
        base.requires_grad_(False)
        device = base.weight.device
        base.theta_a = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        base.theta_b = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, base.in_features // 2, device=device)))
        base.register_forward_hook(official_lorad_hook)
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)
