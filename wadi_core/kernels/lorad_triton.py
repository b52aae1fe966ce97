"""Fused LoRaD Linear in Triton: W' = rot(W, Θ = A·B) is rebuilt tile by tile inside the GEMMs.

Notation as in :mod:`.reference`: ``weight`` W (out×in, in even), ``theta_a`` A (out×r), ``theta_b``
B (r×in/2), Θ = A·B wrapped into [−π, π), input columns paired as (2j, 2j+1). Here M = tokens, N = out,
K2 = in/2 (number of pairs).

Kernels (each one reads W, A, B and recomputes the Θ tile = A[N-block, :] · B[:, pair-block] with ``tl.dot`` in
fp32, then cos/sin and the pair rotation in registers; W', Θ, cos and sin never reach global memory):

* :func:`_fwd_kernel`: y = x·W'ᵀ (+ b). The even and odd columns of x and W are loaded as two separate strided
  (·, BLOCK_K2) tiles, so y += x_even·W'_evenᵀ + x_odd·W'_oddᵀ needs no in-register interleaving.
* :func:`_dx_kernel`: dx = dy·W', reduction over N, dx_even / dx_odd stored with strided pointers.
* :func:`_dtheta_kernel`: the dyᵀ·x GEMM (g_even = dyᵀ·x_even, g_odd = dyᵀ·x_odd, reduction over M) with the
  epilogue dΘ = g_odd·u' − g_even·v', (u', v') the rotated pair; dΘ (out×in/2, fp32) is the only large temporary.

dA = dΘ·Bᵀ, dB = Aᵀ·dΘ and db = Σ dy are plain ``torch`` GEMMs / reductions. Accumulation is fp32; fp16/bf16
inputs are upcast before the trig. On a GPU fp16/bf16 tiles feed ``tl.dot`` in their own dtype (fp32
accumulator); fp32 inputs, and everything under ``TRITON_INTERPRET=1`` (whose bf16 support is broken), use fp32
operands with ``input_precision="ieee"``.

This module imports triton at import time; :func:`wadi_core.kernels.lorad_linear` (which every unmerged
:class:`wadi_core.adapters.LoRaDLinear` calls) imports it on the first CUDA tensor. Under the interpreter,
``TRITON_INTERPRET=1`` must be set before this module is imported (``triton.jit`` reads it when decorating).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference, triton_interpreting


@triton.jit
def _theta_tile(a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_an, s_ar, s_br, s_bj,
                BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_R: tl.constexpr):
    """cos Θ, sin Θ of the (BLOCK_N, BLOCK_K2) tile Θ = A[offs_n, :R] · B[:R, offs_j], fp32, wrapped."""
    theta = tl.zeros((BLOCK_N, BLOCK_K2), dtype=tl.float32)
    offs_r0 = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + offs_r0
        a = tl.load(a_ptr + offs_n[:, None] * s_an + offs_r[None, :] * s_ar,
                    mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_r[:, None] * s_br + offs_j[None, :] * s_bj,
                    mask=(offs_r[:, None] < R) & (offs_j[None, :] < K2), other=0.0).to(tl.float32)
        theta += tl.dot(a, b, input_precision="ieee")
    # wrap into [-pi, pi) as the reference does (a no-op on cos/sin up to rounding)
    shifted = theta + 3.141592653589793
    theta = shifted - 6.283185307179586 * tl.floor(shifted / 6.283185307179586) - 3.141592653589793
    return tl.cos(theta), tl.sin(theta)


@triton.jit
def _rotated_tiles(w_ptr, a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_wn, s_wk, s_an, s_ar, s_br, s_bj,
                   BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_R: tl.constexpr):
    """(W'_even, W'_odd) tiles (BLOCK_N, BLOCK_K2) in fp32 (zeros outside the matrix)."""
    mask = (offs_n[:, None] < N) & (offs_j[None, :] < K2)
    w_base = w_ptr + offs_n[:, None] * s_wn + (2 * offs_j[None, :]) * s_wk
    we = tl.load(w_base, mask=mask, other=0.0).to(tl.float32)
    wo = tl.load(w_base + s_wk, mask=mask, other=0.0).to(tl.float32)
    c, s = _theta_tile(a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_an, s_ar, s_br, s_bj, BLOCK_N, BLOCK_K2, BLOCK_R)
    return we * c - wo * s, we * s + wo * c


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K2, R,
                s_xm, s_xk, s_wn, s_wk, s_an, s_ar, s_br, s_bj, s_ym, s_yn,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, K2, BLOCK_K2):
        offs_j = j0 + tl.arange(0, BLOCK_K2)
        x_mask = (offs_m[:, None] < M) & (offs_j[None, :] < K2)
        x_base = x_ptr + offs_m[:, None] * s_xm + (2 * offs_j[None, :]) * s_xk
        xe = tl.load(x_base, mask=x_mask, other=0.0)
        xo = tl.load(x_base + s_xk, mask=x_mask, other=0.0)
        we, wo = _rotated_tiles(w_ptr, a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_wn, s_wk, s_an, s_ar, s_br, s_bj,
                                BLOCK_N, BLOCK_K2, BLOCK_R)
        if DOT_F32:
            acc += tl.dot(xe.to(tl.float32), tl.trans(we), input_precision="ieee")
            acc += tl.dot(xo.to(tl.float32), tl.trans(wo), input_precision="ieee")
        else:
            acc += tl.dot(xe, tl.trans(we.to(xe.dtype)))
            acc += tl.dot(xo, tl.trans(wo.to(xo.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, M, N, K2, R,
               s_dym, s_dyn, s_wn, s_wk, s_an, s_ar, s_br, s_bj, s_dxm, s_dxk,
               DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_K2 + tl.arange(0, BLOCK_K2)
    acc_e = tl.zeros((BLOCK_M, BLOCK_K2), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_K2), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        we, wo = _rotated_tiles(w_ptr, a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_wn, s_wk, s_an, s_ar, s_br, s_bj,
                                BLOCK_N, BLOCK_K2, BLOCK_R)
        if DOT_F32:
            dy32 = dy.to(tl.float32)
            acc_e += tl.dot(dy32, we, input_precision="ieee")
            acc_o += tl.dot(dy32, wo, input_precision="ieee")
        else:
            acc_e += tl.dot(dy, we.to(dy.dtype))
            acc_o += tl.dot(dy, wo.to(dy.dtype))
    mask = (offs_m[:, None] < M) & (offs_j[None, :] < K2)
    dx_base = dx_ptr + offs_m[:, None] * s_dxm + (2 * offs_j[None, :]) * s_dxk
    tl.store(dx_base, acc_e.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_base + s_dxk, acc_o.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dtheta_kernel(dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, dt_ptr, M, N, K2, R,
                   s_dym, s_dyn, s_xm, s_xk, s_wn, s_wk, s_an, s_ar, s_br, s_bj, s_dtn, s_dtj,
                   DOT_F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_K2 + tl.arange(0, BLOCK_K2)
    g_e = tl.zeros((BLOCK_N, BLOCK_K2), dtype=tl.float32)
    g_o = tl.zeros((BLOCK_N, BLOCK_K2), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dyt = tl.load(dy_ptr + offs_n[:, None] * s_dyn + offs_m[None, :] * s_dym,
                      mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)  # dyᵀ tile (BLOCK_N, BLOCK_M)
        x_mask = (offs_m[:, None] < M) & (offs_j[None, :] < K2)
        x_base = x_ptr + offs_m[:, None] * s_xm + (2 * offs_j[None, :]) * s_xk
        xe = tl.load(x_base, mask=x_mask, other=0.0)
        xo = tl.load(x_base + s_xk, mask=x_mask, other=0.0)
        if DOT_F32:
            dyt32 = dyt.to(tl.float32)
            g_e += tl.dot(dyt32, xe.to(tl.float32), input_precision="ieee")
            g_o += tl.dot(dyt32, xo.to(tl.float32), input_precision="ieee")
        else:
            g_e += tl.dot(dyt, xe.to(dyt.dtype))
            g_o += tl.dot(dyt, xo.to(dyt.dtype))
    # epilogue: dΘ = g_odd·u' − g_even·v'
    u, v = _rotated_tiles(w_ptr, a_ptr, b_ptr, offs_n, offs_j, N, K2, R, s_wn, s_wk, s_an, s_ar, s_br, s_bj,
                          BLOCK_N, BLOCK_K2, BLOCK_R)
    d_theta = g_o * u - g_e * v
    mask = (offs_n[:, None] < N) & (offs_j[None, :] < K2)
    tl.store(dt_ptr + offs_n[:, None] * s_dtn + offs_j[None, :] * s_dtj, d_theta, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

def _block_r(rank: int) -> int:
    """A power of two ≥ 16 (``tl.dot``'s minimum), ≤ 64; larger ranks loop over chunks."""
    return min(64, max(16, triton.next_power_of_2(rank)))


def default_blocks(device: torch.device) -> dict[str, int]:
    """Tile sizes: GEMM-sized on a GPU, the minimum (16) under the interpreter, where each program is slow."""
    if device.type == "cuda" and not triton_interpreting():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K2": 32}
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K2": 16}


def _launch_opts(device: torch.device) -> dict[str, int]:
    return {"num_warps": 4, "num_stages": 3} if device.type == "cuda" and not triton_interpreting() else {}


def _dot_f32(dtype: torch.dtype) -> bool:
    return triton_interpreting() or dtype == torch.float32 or dtype not in (torch.float16, torch.bfloat16)


def _blocks(x: torch.Tensor, rank: int, blocks: dict[str, int] | None) -> dict[str, int]:
    out = default_blocks(x.device)
    out["BLOCK_R"] = _block_r(rank)
    out.update(blocks or {})  # may also carry launch options: num_warps, num_stages
    return out


def lorad_forward(x2d, weight, bias, theta_a, theta_b, blocks=None):
    """y = x·W'ᵀ (+ b) for a 2-D ``x`` (M, in); returned in ``x``'s dtype."""
    M, _ = x2d.shape
    N, K = weight.shape
    K2, R = K // 2, theta_a.shape[1]
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    bl = _blocks(x2d, R, blocks)
    grid = (triton.cdiv(M, bl["BLOCK_M"]), triton.cdiv(N, bl["BLOCK_N"]))
    _fwd_kernel[grid](
        x2d, weight, theta_a, theta_b, bias if bias is not None else y, y, M, N, K2, R,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), theta_a.stride(0), theta_a.stride(1),
        theta_b.stride(0), theta_b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DOT_F32=_dot_f32(x2d.dtype), **{**_launch_opts(x2d.device), **bl})
    return y


def lorad_dx(dy2d, weight, theta_a, theta_b, out_dtype, blocks=None):
    """dx = dy·W' for a 2-D ``dy`` (M, out)."""
    M, _ = dy2d.shape
    N, K = weight.shape
    K2, R = K // 2, theta_a.shape[1]
    dx = torch.empty((M, K), device=dy2d.device, dtype=out_dtype)
    bl = _blocks(dy2d, R, blocks)
    grid = (triton.cdiv(M, bl["BLOCK_M"]), triton.cdiv(K2, bl["BLOCK_K2"]))
    _dx_kernel[grid](
        dy2d, weight, theta_a, theta_b, dx, M, N, K2, R,
        dy2d.stride(0), dy2d.stride(1), weight.stride(0), weight.stride(1), theta_a.stride(0), theta_a.stride(1),
        theta_b.stride(0), theta_b.stride(1), dx.stride(0), dx.stride(1),
        DOT_F32=_dot_f32(dy2d.dtype), **{**_launch_opts(dy2d.device), **bl})
    return dx


def lorad_dtheta(dy2d, x2d, weight, theta_a, theta_b, blocks=None):
    """dΘ (out, in/2), fp32: the epilogue of the dyᵀ·x GEMM."""
    M, _ = dy2d.shape
    N, K = weight.shape
    K2, R = K // 2, theta_a.shape[1]
    if x2d.dtype != dy2d.dtype:
        x2d = x2d.to(dy2d.dtype)
    d_theta = torch.empty((N, K2), device=dy2d.device, dtype=torch.float32)
    bl = _blocks(dy2d, R, blocks)
    grid = (triton.cdiv(N, bl["BLOCK_N"]), triton.cdiv(K2, bl["BLOCK_K2"]))
    _dtheta_kernel[grid](
        dy2d, x2d, weight, theta_a, theta_b, d_theta, M, N, K2, R,
        dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        theta_a.stride(0), theta_a.stride(1), theta_b.stride(0), theta_b.stride(1),
        d_theta.stride(0), d_theta.stride(1),
        DOT_F32=_dot_f32(dy2d.dtype), **{**_launch_opts(dy2d.device), **bl})
    return d_theta


class TritonLoRaDFunction(torch.autograd.Function):
    """Drop-in for :class:`~.reference.LoRaDFunction` ``(x, weight, bias, theta_a, theta_b)`` on Triton.

    Saved for backward: ``x``, A, B and a reference to the frozen W (O(r·(out + in)) extra). Backward runs
    :func:`_dx_kernel` and :func:`_dtheta_kernel`; dA, dB, db are ``torch`` GEMMs / a sum. A gradient for
    ``weight`` itself (never needed inside LoRaD, where W is frozen) is computed with the reference math.
    Tile sizes can be overridden with ``TritonLoRaDFunction.blocks = {...}`` (tests use it to force r > BLOCK_R).
    """

    blocks: dict[str, int] | None = None

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b):
        reference._check_shapes(weight, theta_a, theta_b)
        x2d = x.reshape(-1, x.shape[-1])
        b = None if bias is None else bias.to(x.dtype)
        y = lorad_forward(x2d, weight, b, theta_a, theta_b, TritonLoRaDFunction.blocks)
        ctx.save_for_backward(x, weight, theta_a, theta_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, theta_a, theta_b = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad
        blocks = TritonLoRaDFunction.blocks
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = d_weight = d_bias = d_a = d_b = None
        if need_x:
            dx = lorad_dx(dy2d, weight, theta_a, theta_b, x.dtype, blocks).reshape(x.shape)
        x2d = x.reshape(-1, x.shape[-1])
        if need_a or need_b:
            d_theta = lorad_dtheta(dy2d, x2d, weight, theta_a, theta_b, blocks)  # (out, in/2), fp32
            if need_a:
                d_a = (d_theta @ theta_b.float().T).to(theta_a.dtype)
            if need_b:
                d_b = (theta_a.float().T @ d_theta).to(theta_b.dtype)
        if need_weight:  # reference math; W is frozen in every LoRaD use
            dtype = reference._compute_dtype(weight.dtype)
            theta = reference._angles(theta_a, theta_b, dtype)
            g = (dy2d.T @ x2d.to(dy2d.dtype)).to(dtype).unflatten(-1, (-1, 2))
            d_weight = reference._rotate_pairs(g, theta.cos(), -theta.sin()).to(weight.dtype)
        if need_bias:
            d_bias = dy2d.sum(0).to(ctx.bias_dtype)
        return dx, d_weight, d_bias, d_a, d_b
