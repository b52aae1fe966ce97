"""DoRA baseline: magnitude × normalised (W + (α/r)·B·A), row-wise (Liu et al. 2024; WaDi's adapter ablation).

Notation (PyTorch layout, one magnitude per output row as in PEFT)::

    V  = W + (α/r)·B·A                       # (out, in); lora_A = A (r×in), lora_B = B (out×r, zeros)
    W_dora = m ⊙ V / ‖V‖_row                 # magnitude = m (out,), init ‖W‖_row
    y  = x·W_doraᵀ + b

Identity at init (B = 0, m = ‖W‖_row). As in the DoRA paper (Sec. 4.3) and PEFT, ‖V‖_row is treated as a
constant in backward, so no out×in tensor is kept for it. ``frozen_norm=True`` is the "DoRA with frozen
magnitude" row of WaDi's adapter ablation (``dora_frozen_norm``, ``docs/paper_notes.md#adapter-ablation``): m
stays at the teacher's row norms as a buffer, so only the direction trains. Trainable parameters per layer:
r·(out + in) (+ out when m trains).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class DoRALinear(nn.Module):
    """A frozen ``nn.Linear`` re-parameterised as magnitude × direction with a LoRA update of the direction.

    Adapter tensors are fp32 on the base weight's device. Merge writes W_dora into the base weight and caches
    the per-row scale m/‖V‖ (as PEFT caches the weight norm: it cannot be recomputed from the merged weight);
    unmerge divides by it and subtracts the LoRA delta.

    Args:
        base_layer: the ``nn.Linear`` to adapt.
        rank: r.
        alpha: α; ``None`` means α = r (scale 1).
        frozen_norm: keep m fixed at the teacher's row norms (a buffer, not a trainable parameter).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None, frozen_norm: bool = False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.frozen_norm = frozen_norm
        self.merged = False
        self._merge_scale: torch.Tensor | None = None
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A
        magnitude = torch.linalg.vector_norm(weight.detach().float(), dim=1)  # (out,)
        if frozen_norm:
            self.register_buffer("magnitude", magnitude)
        else:
            self.magnitude = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, frozen_norm={self.frozen_norm}, merged={self.merged}"

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A, (out, in) in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _scale(self) -> torch.Tensor:
        """m / ‖W + ΔW‖_row, (out,) fp32; the norm is a constant for autograd (DoRA paper Sec. 4.3)."""
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.base_layer.weight.float() + self.delta_weight(), dim=1)
        return self.magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = F.linear(x, self.base_layer.weight)  # x·Wᵀ, (..., out)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        y = self._scale() * (base.float() + update)
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias.float()
        return y.to(base.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W ← m ⊙ V / ‖V‖_row, caching the scale for :meth:`unmerge`. A second merge warns and does nothing.

        Args:
            safe_merge: check the merged weight for non-finite values first (ValueError if any).
        """
        if self.merged:
            warnings.warn("DoRALinear is already merged; merge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        scale = self._scale()
        merged = scale[:, None] * (weight.float() + self.delta_weight())
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("DoRA merge produced non-finite weights; the adapter was left unmerged")
        weight.copy_(merged)
        self._merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W_merged / cached scale − ΔW (exact inverse up to rounding in the weight's dtype)."""
        if not self.merged:
            warnings.warn("DoRALinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() / self._merge_scale[:, None] - self.delta_weight())
        self._merge_scale = None
        self.merged = False
