"""The reference LoRaD math (WaDi §3.2, Fig. 2): the rotation :func:`lorad_rotate` and the autograd function
:class:`LoRaDFunction`, the CPU path of :func:`wadi_core.kernels.lorad_linear` and the fused kernel's oracle.

Notation as in :mod:`wadi_core.adapters.lorad` (PyTorch layout): ``weight`` W (out×in, in even), ``theta_a`` A
(out×r), ``theta_b`` B (r×in/2), Θ = A·B wrapped into [−π, π), input columns paired as (2j, 2j+1)::

    W'[i, 2j]   = W[i, 2j]·cos Θ_ij − W[i, 2j+1]·sin Θ_ij
    W'[i, 2j+1] = W[i, 2j]·sin Θ_ij + W[i, 2j+1]·cos Θ_ij
    y = x·W'ᵀ + b

Unlike the official forward hook (``hook_fn`` in ``train_dkd_sd.py``,
``docs/paper_notes.md#cost-of-the-official-hook``), :class:`LoRaDFunction` runs the Linear once and keeps no
out×in temporary for backward: it saves x, A, B (and a reference to the frozen W) and recomputes W', cos Θ and
sin Θ in backward. Imports torch only; :mod:`wadi_core.adapters` re-exports both names.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: fp16/bf16 weights are rotated in fp32, float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _angles(theta_a: torch.Tensor, theta_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Θ = A·B in ``dtype`` (never autocast to half), wrapped into [−π, π); (out, in/2).

    The wrap is a no-op on cos/sin (2π-periodic) and has gradient 1 almost everywhere
    (``docs/paper_notes.md#lorad-properties``).
    """
    device = theta_a.device.type
    no_autocast = torch.autocast(device, enabled=False) if device in _AUTOCAST_DEVICES else nullcontext()
    with no_autocast:
        theta = theta_a.to(dtype) @ theta_b.to(dtype)
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def _rotate_pairs(pairs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (u, v) = ``pairs[..., j, :]`` by its angle; (out, in/2, 2) -> (out, in)."""
    u, v = pairs.unbind(-1)
    return torch.stack((u * cos - v * sin, u * sin + v * cos), dim=-1).flatten(-2)


def _check_shapes(weight: torch.Tensor, theta_a: torch.Tensor, theta_b: torch.Tensor) -> None:
    out_features, in_features = weight.shape
    if in_features % 2:
        raise ValueError(f"LoRaD needs an even number of input features, got weight of shape {tuple(weight.shape)}")
    rank_a, rank_b = theta_a.shape[1], theta_b.shape[0]
    if theta_a.shape[0] != out_features or theta_b.shape[1] != in_features // 2 or rank_a != rank_b:
        raise ValueError(
            f"LoRaD shapes do not fit: weight {tuple(weight.shape)} needs theta_a (out={out_features}, r) and "
            f"theta_b (r, in/2={in_features // 2}); got theta_a {tuple(theta_a.shape)}, theta_b {tuple(theta_b.shape)}"
        )


def lorad_rotate(weight: torch.Tensor, theta_a: torch.Tensor, theta_b: torch.Tensor) -> torch.Tensor:
    """The rotated weight W' of WaDi §3.2 (official pairing (2j, 2j+1), Θ wrapped into [−π, π)).

    The single source of truth for the rotation: :class:`LoRaDFunction`,
    :meth:`~wadi_core.adapters.LoRaDLinear.merge` and :meth:`~wadi_core.adapters.LoRaDLinear.unmerge` (called with
    −A, the exact inverse rotation) all go through it.

    Args:
        weight: W, (out, in) with ``in`` even.
        theta_a: A, (out, r).
        theta_b: B, (r, in/2).

    Returns:
        W', (out, in), computed in (at least) fp32 and returned in ``weight``'s dtype. Differentiable with
        plain autograd (the naive reference for :class:`LoRaDFunction`).
    """
    _check_shapes(weight, theta_a, theta_b)
    dtype = _compute_dtype(weight.dtype)
    theta = _angles(theta_a, theta_b, dtype)  # (out, in/2)
    pairs = weight.to(dtype).unflatten(-1, (-1, 2))  # (out, in/2, 2)
    return _rotate_pairs(pairs, theta.cos(), theta.sin()).to(weight.dtype)


class LoRaDFunction(torch.autograd.Function):
    """y = x·W'ᵀ + b with W' = :func:`lorad_rotate` (W, A, B), one matmul forward, W' recomputed in backward.

    Saved for backward: ``x``, ``theta_a``, ``theta_b`` and ``weight``. W is the frozen base parameter, which
    lives in memory anyway: saving it stores a reference (no copy) and lets autograd's version counter catch an
    in-place merge between forward and backward. No out×in temporary (W', cos Θ, sin Θ, fp32 copies) survives
    the forward; the extra memory kept for backward is O(r·(out + in)).

    Backward (g = ∂L/∂W' = dyᵀ·x, per pair (u, v) = (W_2j, W_2j+1), (u', v') their rotations)::

        dx  = dy·W'
        dΘ  = g_2j·(−u sin Θ − v cos Θ) + g_2j+1·(u cos Θ − v sin Θ) = g_2j+1·u' − g_2j·v'
        dA  = dΘ·Bᵀ,   dB = Aᵀ·dΘ,   db = Σ dy
        dW  = g rotated by −Θ   (only if ``weight`` requires grad; inside LoRaD it never does)

    Angles and dΘ are computed in (at least) fp32; fp16/bf16 ``x``/``weight`` are upcast where needed and every
    gradient is returned in its input's dtype. ``x`` may have any leading dims: (..., in) -> (..., out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b):
        rotated = lorad_rotate(weight, theta_a, theta_b).to(x.dtype)  # (out, in), freed on return
        ctx.save_for_backward(x, weight, theta_a, theta_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, rotated, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight, theta_a, theta_b = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad
        dtype = _compute_dtype(weight.dtype)
        theta = _angles(theta_a, theta_b, dtype)
        cos, sin = theta.cos(), theta.sin()  # (out, in/2)
        rotated = _rotate_pairs(weight.to(dtype).unflatten(-1, (-1, 2)), cos, sin)  # W', (out, in)
        dx = d_weight = d_bias = d_a = d_b = None
        if need_x:
            dx = (dy @ rotated.to(weight.dtype).to(dy.dtype)).to(x.dtype)  # the same W' the forward used
        dy_flat = dy.reshape(-1, dy.shape[-1])  # (N, out)
        if need_weight or need_a or need_b:
            x_flat = x.reshape(-1, x.shape[-1]).to(dy.dtype)  # (N, in)
            g_u, g_v = (dy_flat.T @ x_flat).to(dtype).unflatten(-1, (-1, 2)).unbind(-1)  # ∂L/∂W' pairs, (out, in/2)
            if need_a or need_b:
                r_u, r_v = rotated.unflatten(-1, (-1, 2)).unbind(-1)
                d_theta = g_v * r_u - g_u * r_v  # (out, in/2); the wrap has gradient 1
                if need_a:
                    d_a = (d_theta @ theta_b.to(dtype).T).to(theta_a.dtype)
                if need_b:
                    d_b = (theta_a.to(dtype).T @ d_theta).to(theta_b.dtype)
            if need_weight:
                d_weight = _rotate_pairs(torch.stack((g_u, g_v), dim=-1), cos, -sin).to(weight.dtype)
        if need_bias:
            d_bias = dy_flat.sum(0).to(ctx.bias_dtype)
        return dx, d_weight, d_bias, d_a, d_b
