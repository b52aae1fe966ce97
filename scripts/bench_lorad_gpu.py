"""GPU benchmark of the fused Triton LoRaD Linear (issue 6): forward+backward time and memory at SD1.5 shapes.

Methods, per (dtype, shape, rank):

* ``triton`` (one row per tile config): :class:`wadi_core.kernels.lorad_triton.TritonLoRaDFunction`;
* ``reference``: :class:`wadi_core.adapters.lorad.LoRaDFunction`;
* ``reference_compiled``: ``torch.compile`` of the reference (W' built by ``lorad_rotate`` + ``F.linear``);
* ``official_hook``: :class:`wadi_core.adapters.official_hook.OfficialHookLoRaD` (the official code's semantics);
* ``frozen_linear``: ``nn.Linear`` with W frozen (dx only); ``full_ft_linear``: ``nn.Linear`` with W trained;
* ``floor``: LoRaD's irreducible GEMMs as plain ``torch.matmul`` (x·W'ᵀ, dy·W', dyᵀ·x in the input dtype;
  A·B, dΘ·Bᵀ, Aᵀ·dΘ in fp32), summed.

Columns: median ms of forward+backward, ratio to the floor, peak extra memory during fwd+bwd, memory kept alive
between forward and backward (saved for backward + output), and the max relative error vs the reference (Triton
rows; the GPU is the only place bf16 is checked). Writes ``<out>/kernel_bench_<gpu>.csv``.

Needs only torch, safetensors and triton (torch 2.11 + triton 3.6 on the lent device): ``wadi_core.adapters``
never imports diffusers. A time budget (``--budget-s``) keeps the whole run under five minutes; rows past it
are marked ``skipped_budget``.

    python scripts/bench_lorad_gpu.py --out results/tables
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wadi_core.adapters import lorad  # noqa: E402  (torch + safetensors only: no triton, no diffusers)
from wadi_core.adapters import official_hook as hook_mod  # noqa: E402

# SD1.5 UNet Linear layers at 512×512 (64×64 latent), batch 2: (name, tokens M, out, in)
SD15_SHAPES = [
    ("attn_qkvo_320", 2 * 4096, 320, 320),
    ("xattn_kv_320", 2 * 77, 320, 768),
    ("ff_geglu_in_320", 2 * 4096, 2560, 320),
    ("ff_out_320", 2 * 4096, 320, 1280),
    ("attn_qkvo_640", 2 * 1024, 640, 640),
    ("ff_geglu_in_640", 2 * 1024, 5120, 640),
    ("ff_out_640", 2 * 1024, 640, 2560),
    ("attn_qkvo_1280", 2 * 256, 1280, 1280),
    ("ff_geglu_in_1280", 2 * 256, 10240, 1280),
    ("ff_out_1280", 2 * 256, 1280, 5120),
    ("mid_attn_qkvo_1280", 2 * 64, 1280, 1280),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_CONFIGS = {
    "64x64x32_w4": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K2": 32, "num_warps": 4, "num_stages": 3},
    "128x128x32_w8": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K2": 32, "num_warps": 8, "num_stages": 3},
}
FIELDS = ["gpu", "torch", "triton", "dtype", "shape", "tokens", "out", "in", "rank", "method", "status", "fwd_bwd_ms",
          "fwd_ms", "ratio_to_floor", "peak_extra_mib", "kept_for_backward_mib", "max_rel_err_vs_reference", "note"]


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def memory_profile(forward, dy) -> tuple[float, float]:
    """(peak extra MiB during fwd+bwd, MiB alive between forward and backward incl. the output)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    y.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del y
    return peak / 2**20, kept / 2**20


def build_methods(x, weight, bias, theta_a, theta_b, lorad, hook_mod, triton_fn, compiled, include_compile):
    """({name: forward closure returning y}, every tensor whose .grad a step must clear)."""
    LoRaDFunction = lorad.LoRaDFunction
    out_f, in_f = weight.shape
    methods = {}
    if triton_fn is not None:
        for cfg_name, cfg in TRITON_CONFIGS.items():
            def run_triton(cfg=cfg):
                triton_fn.blocks = cfg
                return triton_fn.apply(x, weight, bias, theta_a, theta_b)
            methods[f"triton_{cfg_name}"] = run_triton
    methods["reference"] = lambda: LoRaDFunction.apply(x, weight, bias, theta_a, theta_b)
    if include_compile:
        methods["reference_compiled"] = lambda: compiled(x, weight, bias, theta_a, theta_b)
    hook_base = nn.Linear(in_f, out_f, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        hook_base.weight.copy_(weight)
        hook_base.bias.copy_(bias)
    hooked = hook_mod.OfficialHookLoRaD(hook_base, theta_a.shape[1])
    with torch.no_grad():
        hooked.base.theta_a.copy_(theta_a)
        hooked.base.theta_b.copy_(theta_b)
    methods["official_hook"] = lambda: hooked(x)
    frozen = nn.Linear(in_f, out_f, device=x.device, dtype=x.dtype).requires_grad_(False)
    methods["frozen_linear"] = lambda: frozen(x)
    full = nn.Linear(in_f, out_f, device=x.device, dtype=x.dtype)
    methods["full_ft_linear"] = lambda: full(x)
    return methods, [x, theta_a, theta_b, *hooked.parameters(), *full.parameters()]


def floor_fn(x, weight, theta_a, theta_b, dy):
    """LoRaD's irreducible GEMMs as torch.matmul, buffers preallocated."""
    m, in_f = x.shape
    out_f = weight.shape[0]
    w_rot = weight.clone()
    d_theta = torch.randn(out_f, in_f // 2, device=x.device)
    outs = [torch.empty(m, out_f, device=x.device, dtype=x.dtype), torch.empty(m, in_f, device=x.device, dtype=x.dtype),
            torch.empty(out_f, in_f, device=x.device, dtype=x.dtype), torch.empty(out_f, in_f // 2, device=x.device),
            torch.empty(out_f, theta_a.shape[1], device=x.device), torch.empty(theta_b.shape, device=x.device)]
    xd, dyd = x.detach(), dy

    def run():
        torch.matmul(xd, w_rot.T, out=outs[0])
        torch.matmul(dyd, w_rot, out=outs[1])
        torch.matmul(dyd.T, xd, out=outs[2])
        torch.matmul(theta_a.detach(), theta_b.detach(), out=outs[3])
        torch.matmul(d_theta, theta_b.detach().T, out=outs[4])
        torch.matmul(theta_a.detach().T, d_theta, out=outs[5])
    return run


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tables")
    parser.add_argument("--ranks", default="64,256", help="comma-separated LoRaD ranks")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--shapes", default="all", help="comma-separated names from SD15_SHAPES, or 'all'")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop measuring after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lorad_gpu.py needs a CUDA GPU (none visible); nothing measured.", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    try:
        import triton

        from wadi_core.kernels.lorad_triton import TritonLoRaDFunction
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - record and go on with the other methods
        print(f"triton unavailable: {exc!r}", file=sys.stderr)
        TritonLoRaDFunction, triton_version = None, "unavailable"

    def reference_math(x, weight, bias, theta_a, theta_b):
        return F.linear(x, lorad.lorad_rotate(weight, theta_a, theta_b).to(x.dtype), bias)

    compiled = None if args.no_compile else torch.compile(reference_math)
    shapes = SD15_SHAPES if args.shapes == "all" else [s for s in SD15_SHAPES if s[0] in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    gpu = gpu_slug()
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    # eager methods first for every shape, torch.compile last (compilation is what eats the budget)
    for phase in ("eager", "compile") if compiled is not None else ("eager",):
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for shape_name, m, out_f, in_f in shapes:
                for rank in ranks:
                    base = {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "dtype": dtype_name,
                            "shape": shape_name, "tokens": m, "out": out_f, "in": in_f, "rank": rank}
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    x = torch.randn(m, in_f, device="cuda", dtype=dtype, generator=gen).requires_grad_()
                    weight = (torch.randn(out_f, in_f, device="cuda", generator=gen) / math.sqrt(in_f)).to(dtype)
                    bias = torch.randn(out_f, device="cuda", generator=gen).to(dtype)
                    theta_a = (0.02 * torch.randn(out_f, rank, device="cuda", generator=gen)).requires_grad_()
                    theta_b = nn.init.xavier_uniform_(torch.empty(rank, in_f // 2, device="cuda")).requires_grad_()
                    dy = torch.randn(m, out_f, device="cuda", dtype=dtype, generator=gen)
                    methods, grad_leaves = build_methods(x, weight, bias, theta_a, theta_b, lorad, hook_mod,
                                                         TritonLoRaDFunction, compiled,
                                                         include_compile=phase == "compile")
                    if phase == "compile":
                        methods = {"reference_compiled": methods["reference_compiled"]}
                    floor_ms = None
                    if phase == "eager":
                        floor_ms = cuda_time(floor_fn(x, weight, theta_a, theta_b, dy), args.warmup, args.iters)
                        rows.append({**base, "method": "floor", "status": "ok", "fwd_bwd_ms": f"{floor_ms:.4f}",
                                     "ratio_to_floor": "1.000", "note": "sum of the six irreducible GEMMs"})
                    else:
                        prev = [r for r in rows if r["method"] == "floor" and r["dtype"] == dtype_name
                                and r["shape"] == shape_name and r["rank"] == rank]
                        floor_ms = float(prev[0]["fwd_bwd_ms"]) if prev else None
                    y_ref = lorad.LoRaDFunction.apply(x, weight, bias, theta_a, theta_b).detach()
                    for name, forward in methods.items():
                        row = {**base, "method": name}
                        if time.monotonic() - t_start > args.budget_s:
                            rows.append({**row, "status": "skipped_budget"})
                            continue
                        try:
                            def step(forward=forward):
                                for leaf in grad_leaves:
                                    leaf.grad = None
                                forward().backward(dy)
                            if name.startswith("triton"):
                                row["max_rel_err_vs_reference"] = f"{rel_err(forward().detach(), y_ref):.2e}"
                            ms = cuda_time(step, args.warmup, args.iters)
                            with torch.no_grad():
                                fwd_ms = cuda_time(forward, args.warmup, args.iters)
                            peak, kept = memory_profile(forward, dy)
                            row.update(status="ok", fwd_bwd_ms=f"{ms:.4f}", fwd_ms=f"{fwd_ms:.4f}",
                                       peak_extra_mib=f"{peak:.2f}", kept_for_backward_mib=f"{kept:.2f}")
                            if floor_ms:
                                row["ratio_to_floor"] = f"{ms / floor_ms:.3f}"
                        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the table
                            row.update(status="error", note=repr(exc)[:300])
                        rows.append(row)
                        print({k: row.get(k) for k in ("dtype", "shape", "rank", "method", "status", "fwd_bwd_ms",
                                                       "ratio_to_floor", "max_rel_err_vs_reference")}, flush=True)
                    if TritonLoRaDFunction is not None:
                        TritonLoRaDFunction.blocks = None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernel_bench_{gpu}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows) in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
