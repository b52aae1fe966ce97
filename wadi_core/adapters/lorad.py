"""LoRaD: low-rank rotations of weight directions (WaDi §3.2, Fig. 2; ``docs/paper_notes.md#lorad-definition``).

Notation (PyTorch layout, weight ``W`` of shape out×in; the paper's Θ is the transpose of the code's):

| code | paper | shape | init |
|---|---|---|---|
| ``weight`` | W | out × in (in even) | the teacher's, frozen |
| ``theta_a`` | A | out × r | zeros |
| ``theta_b`` | B | r × in/2 | Xavier-uniform |
| ``theta`` | Θ = A·B, wrapped into [−π, π) | out × in/2 | 0 |
| ``rotated_weight`` | W_ro (W' below) | out × in | W |

Input columns pair as (2j, 2j+1) and every entry Θ_ij is its own 2-D Givens angle::

    W'[i, 2j]   = W[i, 2j]·cos Θ_ij − W[i, 2j+1]·sin Θ_ij
    W'[i, 2j+1] = W[i, 2j]·sin Θ_ij + W[i, 2j+1]·cos Θ_ij
    y = x·W'ᵀ + b

so every row norm and every pair norm of W is preserved, and W' = W at init. Trainable parameters per layer:
r·(out + in/2) (``docs/paper_notes.md#lorad-properties``).

The math lives in :mod:`wadi_core.kernels.reference` (:func:`lorad_rotate`, :class:`LoRaDFunction`, re-exported
here), beside the fused Triton kernel. :meth:`LoRaDLinear.forward` goes through the dispatcher
:func:`wadi_core.kernels.lorad_linear`: the Triton kernel for CUDA tensors (when triton imports), the reference
:class:`LoRaDFunction` otherwise (CPU); ``WADI_LORAD_BACKEND`` = ``triton`` | ``reference`` forces one. Both run
the Linear once and keep no out×in temporary for backward, unlike the official forward hook (``hook_fn`` in
``train_dkd_sd.py``, ``docs/paper_notes.md#cost-of-the-official-hook``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..kernels import LoRaDFunction, lorad_linear, lorad_rotate

__all__ = ["LoRaDFunction", "LoRaDLinear", "lorad_rotate"]


class LoRaDLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight directions are rotated by LoRaD (WaDi §3.2).

    ``theta_a`` (A, out×r, zeros) and ``theta_b`` (B, r×in/2, Xavier-uniform) are fp32 parameters created on
    the base weight's device (the ``meta`` device included, for parameter counting); the base layer is frozen.
    The forward runs :func:`wadi_core.kernels.lorad_linear` (fused Triton on CUDA, :class:`LoRaDFunction` on CPU,
    ``WADI_LORAD_BACKEND`` to force); once merged it runs the plain Linear on W'.

    Args:
        base_layer: the ``nn.Linear`` to adapt; ``in_features`` must be even.
        rank: r.
        name: the layer's name in its model, quoted by the odd-``in_features`` error.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, name: str = "<unnamed>"):
        super().__init__()
        if base_layer.in_features % 2:
            raise ValueError(
                f"LoRaD cannot adapt {name!r}: in_features={base_layer.in_features} is odd (columns are rotated "
                "in pairs, WaDi §3.2); exclude the layer from injection"
            )
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = rank
        self.merged = False
        device = base_layer.weight.device
        out_features, in_features = base_layer.out_features, base_layer.in_features
        self.theta_a = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        self.theta_b = nn.Parameter(torch.empty(rank, in_features // 2, device=device, dtype=torch.float32))
        nn.init.xavier_uniform_(self.theta_b)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, merged={self.merged}"

    def rotated_weight(self) -> torch.Tensor:
        """W' in the base weight's dtype (differentiable in A and B)."""
        return lorad_rotate(self.base_layer.weight, self.theta_a, self.theta_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return lorad_linear(x, self.base_layer.weight, self.base_layer.bias, self.theta_a, self.theta_b)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Write W' into the base weight. A second merge warns and does nothing.

        Args:
            safe_merge: check W' for non-finite values before writing it (ValueError if any).
        """
        if self.merged:
            warnings.warn("LoRaDLinear is already merged; merge() did nothing", stacklevel=2)
            return
        rotated = self.rotated_weight()
        if safe_merge and not torch.isfinite(rotated).all():
            raise ValueError("LoRaD merge produced non-finite weights; the adapter was left unmerged")
        self.base_layer.weight.copy_(rotated)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Rotate the merged weight back by −Θ (the exact inverse; W restored up to fp rounding of the weight's
        dtype: ~1e-7 relative in fp32, one rounding per merge/unmerge in fp16/bf16)."""
        if not self.merged:
            warnings.warn("LoRaDLinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        self.base_layer.weight.copy_(lorad_rotate(self.base_layer.weight, -self.theta_a, self.theta_b))
        self.merged = False
