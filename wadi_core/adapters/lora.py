"""LoRA baseline: W + (α/r)·B·A (Hu et al. 2021, as implemented by PEFT; a baseline of WaDi's adapter ablation).

Notation (PyTorch layout): ``lora_A`` = A (r×in, Kaiming-uniform as in PEFT), ``lora_B`` = B (out×r, zeros),
``scaling`` = α/r. Identity at init because B = 0. Trainable parameters per layer: r·(out + in).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank additive update: y = x·(W + (α/r)·B·A)ᵀ + b.

    ``lora_A`` and ``lora_B`` are fp32 parameters on the base weight's device; the adapter path runs in fp32
    and is cast to the base output's dtype. Merge adds :meth:`delta_weight`, unmerge subtracts the same call.

    Args:
        base_layer: the ``nn.Linear`` to adapt.
        rank: r.
        alpha: α; ``None`` means α = r (scale 1).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.merged = False
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A, (out, in) in fp32: the single source of truth for merge and unmerge."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W ← W + :meth:`delta_weight`. A second merge warns and does nothing.

        Args:
            safe_merge: check the merged weight for non-finite values first (ValueError if any).
        """
        if self.merged:
            warnings.warn("LoRALinear is already merged; merge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("LoRA merge produced non-finite weights; the adapter was left unmerged")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − :meth:`delta_weight` (exact inverse up to rounding in the weight's dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False
