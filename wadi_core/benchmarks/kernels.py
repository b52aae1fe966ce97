"""Fused Triton LoRaD against its reference, the official hook, plain Linears and the GEMM floor.

``python -m wadi_core.benchmarks kernels`` (``make bench-kernels``) times forward+backward per Linear at the SD1.5
shapes of :data:`~.measure.SD15_LINEAR_SHAPES` and writes ``results/tables/benchmarks_kernels_<device>.csv``.
Methods, per (dtype, shape, rank):

* ``triton_<tiles>``: :class:`wadi_core.kernels.lorad_triton.TritonLoRaDFunction`, one row per tile config
  (CUDA; on CPU only under ``TRITON_INTERPRET=1``, where the time is the interpreter's, not a speed);
* ``reference``: :class:`wadi_core.kernels.LoRaDFunction`; ``reference_compiled``: ``torch.compile`` of the
  reference math (``lorad_rotate`` + ``F.linear``);
* ``official_hook``: :class:`wadi_core.adapters.official_hook.OfficialHookLoRaD` (the cost of ``hook_fn`` in the
  official ``train_dkd_sd.py``);
* ``frozen_linear`` (W frozen, dx only) and ``full_ft_linear`` (W trained): what a plain Linear costs;
* ``floor``: LoRaD's irreducible GEMMs as plain ``torch.matmul`` (x·W'ᵀ, dy·W', dyᵀ·x in the input dtype; A·B,
  dΘ·Bᵀ, Aᵀ·dΘ in fp32), summed: no LoRaD implementation can beat it on the same device.

Columns: median ms of forward+backward and of forward alone, ratio to the floor, bytes autograd saves for backward
beyond x and the frozen W (``saved_for_backward_mib``; LoRaD's claim is O(r·(out+in))), peak extra memory during
forward+backward (CUDA only), and for Triton rows the max relative error of y, dx, dA, dB against the reference
(the GPU is the only place bf16 is checked). Defaults: fp16 and bf16 on CUDA, fp32 on CPU; a time budget keeps a
GPU run under five minutes (rows past it are ``skipped_budget``). :func:`load_kernel_benchmarks` and
:func:`summarise_kernel_benchmark` read the tables back for notebook 06.

Imports torch, triton (on first use) and pandas only, not diffusers or transformers: GPU machines that carry
torch and triton alone can run it.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..adapters.official_hook import OfficialHookLoRaD
from ..kernels import LoRaDFunction, lorad_rotate
from .measure import (
    QUICK_LINEAR_SHAPES,
    QUICK_RANK,
    SD15_LINEAR_SHAPES,
    LinearShape,
    cpu_model,
    median_ms,
    saved_for_backward_bytes,
    sd15_shapes,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_CONFIGS = {
    "64x64x32_w4": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K2": 32, "num_warps": 4, "num_stages": 3},
    "128x128x32_w8": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K2": 32, "num_warps": 8, "num_stages": 3},
}
FIELDS = ["device", "device_name", "torch", "triton", "dtype", "shape", "tokens", "out", "in", "rank", "method",
          "status", "fwd_bwd_ms", "fwd_ms", "ratio_to_floor", "saved_for_backward_mib", "peak_extra_mib",
          "max_rel_err_vs_reference", "note"]
# What the Triton path must reach at every SD1.5 shape: forward+backward within 1.2× the floor of LoRaD's six GEMMs
# (the elementwise rotation hidden inside them), and at least 2× faster than the official hook.
MAX_TRITON_TIME_VS_FLOOR = 1.2
MIN_TRITON_SPEEDUP_VS_HOOK = 2.0

# Method families of :func:`best_triton_tiles` (every Triton tile config is family "triton").
FAMILIES = ["floor", "triton", "reference", "reference_compiled", "official_hook", "frozen_linear", "full_ft_linear"]
SUMMARY_COLUMNS = ["floor_ms", "triton_ms", "triton_tiles", "reference_ms", "reference_compiled_ms",
                   "official_hook_ms", "frozen_linear_ms", "full_ft_linear_ms", "triton_vs_floor", "speedup_vs_hook",
                   "speedup_vs_reference", "triton_saved_mib", "hook_saved_mib", "triton_max_rel_err",
                   "triton_vs_floor_within_bound", "speedup_vs_hook_within_bound"]

Forward = Callable[[], Tensor]


def device_slug(device: torch.device) -> str:
    """File-name tag of ``device``: the GPU's name (``nvidia_h100_80gb_hbm3``) or ``cpu``."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
    return device.type


def peak_extra_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory one ``step()`` allocates above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def make_inputs(tokens: int, out_f: int, in_f: int, rank: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> dict[str, Tensor]:
    """x (requires grad, as inside an adapted U-Net), W, b, A, B (fp32, trainable, Θ away from 0) and dy."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    return {
        "x": randn(tokens, in_f).to(dtype).requires_grad_(),
        "weight": (randn(out_f, in_f) / math.sqrt(in_f)).to(dtype),
        "bias": randn(out_f).to(dtype),
        "theta_a": (0.02 * randn(out_f, rank)).requires_grad_(),
        "theta_b": (randn(rank, in_f // 2) * math.sqrt(2.0 / (rank + in_f // 2))).requires_grad_(),  # Xavier
        "dy": randn(tokens, out_f).to(dtype),
    }


def _reference_math(x: Tensor, weight: Tensor, bias: Tensor, theta_a: Tensor, theta_b: Tensor) -> Tensor:
    return F.linear(x, lorad_rotate(weight, theta_a, theta_b).to(x.dtype), bias)


def build_methods(t: dict[str, Tensor], triton_function, compiled
                  ) -> tuple[dict[str, tuple[Forward, list[Tensor]]], list[Tensor]]:
    """``({method: (forward closure, its frozen tensors)}, every tensor a step must clear the grad of)``."""
    x, weight, bias, theta_a, theta_b = (t[k] for k in ("x", "weight", "bias", "theta_a", "theta_b"))
    out_f, in_f = weight.shape
    methods: dict[str, tuple[Forward, list[Tensor]]] = {}
    if triton_function is not None:
        for name, tiles in TRITON_CONFIGS.items():
            def run_triton(tiles=tiles):
                triton_function.blocks = tiles
                return triton_function.apply(x, weight, bias, theta_a, theta_b)

            methods[f"triton_{name}"] = (run_triton, [x, weight])
    methods["reference"] = (lambda: LoRaDFunction.apply(x, weight, bias, theta_a, theta_b), [x, weight])
    if compiled is not None:
        methods["reference_compiled"] = (lambda: compiled(x, weight, bias, theta_a, theta_b), [x, weight])

    def linear(trainable: bool) -> nn.Linear:
        layer = nn.Linear(in_f, out_f, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return layer.requires_grad_(trainable)

    hooked = OfficialHookLoRaD(linear(False), theta_a.shape[1]).to(x.device)
    with torch.no_grad():
        hooked.base.theta_a.copy_(theta_a)
        hooked.base.theta_b.copy_(theta_b)
    methods["official_hook"] = (lambda: hooked(x), [x, hooked.base.weight])
    frozen, full = linear(False), linear(True)
    methods["frozen_linear"] = (lambda: frozen(x), [x, frozen.weight])
    methods["full_ft_linear"] = (lambda: full(x), [x, full.weight])
    return methods, [x, theta_a, theta_b, *hooked.parameters(), *full.parameters()]


def floor_step(t: dict[str, Tensor]) -> Callable[[], None]:
    """LoRaD's six irreducible GEMMs as ``torch.matmul`` into preallocated outputs (see the module doc)."""
    x, weight, theta_a, theta_b, dy = (t[k].detach() for k in ("x", "weight", "theta_a", "theta_b", "dy"))
    tokens, in_f = x.shape
    out_f, rank = theta_a.shape
    device = x.device
    w_rot = weight.clone()
    d_theta = torch.randn(out_f, in_f // 2, device=device)
    y, dx = torch.empty(tokens, out_f, device=device, dtype=x.dtype), torch.empty_like(x)
    g = torch.empty(out_f, in_f, device=device, dtype=x.dtype)
    theta = torch.empty(out_f, in_f // 2, device=device)
    d_a, d_b = torch.empty(out_f, rank, device=device), torch.empty_like(theta_b)

    def run():
        torch.matmul(x, w_rot.T, out=y)
        torch.matmul(dy, w_rot, out=dx)
        torch.matmul(dy.T, x, out=g)
        torch.matmul(theta_a, theta_b, out=theta)
        torch.matmul(d_theta, theta_b.T, out=d_a)
        torch.matmul(theta_a.T, d_theta, out=d_b)

    return run


def _grads(forward: Forward, t: dict[str, Tensor]) -> dict[str, Tensor]:
    leaves = {"dx": t["x"], "dA": t["theta_a"], "dB": t["theta_b"]}
    for leaf in leaves.values():
        leaf.grad = None
    y = forward()
    y.backward(t["dy"])
    return {"y": y.detach(), **{name: leaf.grad.clone() for name, leaf in leaves.items()}}


def max_rel_err(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """max over y, dx, dA, dB of max |actual − expected| / max |expected|."""
    return max(((actual[k].float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12)).item()
               for k, v in expected.items())


# Agreement cases, as in tests/kernels: (leading dims of x, out, in, rank, forced tiles).
AGREEMENT_CASES: dict[str, tuple[tuple[int, ...], int, int, int, dict | None]] = {
    "ragged: 37 tokens, 45×50, r=3": ((37,), 45, 50, 3, None),
    "rank 1: 19 tokens, 20×34": ((19,), 20, 34, 1, None),
    "r=20 over two BLOCK_R=16 chunks": ((16,), 32, 64, 20, {"BLOCK_R": 16}),
    "3-D x (2×21), several tiles per axis": ((2, 21), 40, 72, 5, None),
}
# max |error| / max |reference|: the reference rounds W' and dyᵀ·x to fp16/bf16, the kernels keep them in fp32.
AGREEMENT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def reference_agreement(cases: dict = AGREEMENT_CASES, dtypes: tuple[str, ...] = ("fp32", "fp16"),
                        device: torch.device | str = "cpu", angle_std: float = 0.7, seed: int = 0) -> pd.DataFrame:
    """Triton's y, dx, dA, dB, db against :class:`~wadi_core.kernels.LoRaDFunction`, per case, dtype and bias.

    A and B are drawn with std ``angle_std`` so that Θ = A·B reaches beyond ±π (the wrap is exercised). On CPU this
    needs ``TRITON_INTERPRET=1`` set before triton is imported. Returns a DataFrame: case, dtype, bias, one relative
    error column per output (max |Triton − reference| / max |reference|), tolerance, holds.
    """
    from ..kernels.lorad_triton import TritonLoRaDFunction

    device = torch.device(device)
    rows = []
    for (name, (lead, out_f, in_f, rank, tiles)), dtype_name, with_bias in (
            (c, d, b) for c in cases.items() for d in dtypes for b in (True, False)):
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[dtype_name]
        x = torch.randn(*lead, in_f, device=device, generator=gen).to(dtype)
        weight = (torch.randn(out_f, in_f, device=device, generator=gen) / math.sqrt(in_f)).to(dtype)
        bias = torch.randn(out_f, device=device, generator=gen).to(dtype) if with_bias else None
        theta_a = angle_std * torch.randn(out_f, rank, device=device, generator=gen)
        theta_b = angle_std * torch.randn(rank, in_f // 2, device=device, generator=gen)
        dy = torch.randn(*lead, out_f, device=device, generator=gen).to(dtype)
        outputs = {}
        for label, function in (("triton", TritonLoRaDFunction), ("reference", LoRaDFunction)):
            leaves = {k: None if v is None else v.clone().requires_grad_()
                      for k, v in (("dx", x), ("db", bias), ("dA", theta_a), ("dB", theta_b))}
            TritonLoRaDFunction.blocks = tiles
            try:
                y = function.apply(leaves["dx"], weight, leaves["db"], leaves["dA"], leaves["dB"])
                y.backward(dy)
            finally:
                TritonLoRaDFunction.blocks = None
            outputs[label] = {"y": y.detach(), **{k: v.grad for k, v in leaves.items() if v is not None}}
        errors = {f"{k} rel. error": max_rel_err({k: outputs["triton"][k]}, {k: v})
                  for k, v in outputs["reference"].items()}
        tolerance = AGREEMENT_TOLERANCE[dtype_name]
        rows.append({"case": name, "dtype": dtype_name, "bias": with_bias, **errors, "tolerance": tolerance,
                     "holds": max(errors.values()) <= tolerance})
    return pd.DataFrame(rows)


def saved_bytes_by_rank(tokens: int, out_f: int, in_f: int, ranks: tuple[int, ...],
                        device: torch.device | str = "cpu") -> pd.DataFrame:
    """Bytes each LoRaD implementation keeps for backward beyond x and W, per rank, beside 4·r·(out + in/2).

    Triton runs only where :func:`wadi_core.kernels.select_backend` allows it (CUDA, or the interpreter on CPU).
    Returns a DataFrame: rank, method (triton, reference, official_hook), saved_bytes, factor_bytes (A and B in fp32).
    """
    from ..kernels.lorad_triton import TritonLoRaDFunction

    rows = []
    for rank in ranks:
        t = make_inputs(tokens, out_f, in_f, rank, torch.float32, torch.device(device))
        methods, _ = build_methods(t, TritonLoRaDFunction, None)
        methods["triton"] = methods.pop(next(name for name in methods if name.startswith("triton_")))
        for name in ("triton", "reference", "official_hook"):
            forward, frozen = methods[name]
            rows.append({"rank": rank, "method": name,
                         "saved_bytes": saved_for_backward_bytes(forward, frozen, t["dy"]),
                         "factor_bytes": 4 * rank * (out_f + in_f // 2)})
    return pd.DataFrame(rows)


def _triton_function(device: torch.device):
    """(TritonLoRaDFunction or None, triton version or why not) for ``device``."""
    from ..kernels import triton_interpreting

    if device.type != "cuda" and not triton_interpreting():
        return None, "not run (CPU: Triton only in its interpreter, TRITON_INTERPRET=1)"
    try:
        import triton

        from ..kernels.lorad_triton import TritonLoRaDFunction
    except Exception as exc:  # noqa: BLE001 - the other methods still get measured
        return None, f"unavailable: {exc!r}"[:200]
    return TritonLoRaDFunction, triton.__version__


def _compiled_reference():
    """``torch.compile`` of the reference math, allowed to specialise once per benchmarked shape."""
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    return torch.compile(_reference_math)


def run_kernel_benchmark(
    device: torch.device | str,
    dtypes: tuple[str, ...],
    shapes: tuple[LinearShape, ...] = SD15_LINEAR_SHAPES,
    ranks: tuple[int, ...] = (64, 256),
    iters: int = 20,
    warmup: int = 3,
    budget_s: float = 270.0,
    compile_reference: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Every method of the module doc at every (dtype, shape, rank); one CSV row (a dict) per method.

    Eager methods run first for every combination, ``torch.compile`` last (compilation is what eats a budget).
    Methods past ``budget_s`` seconds get ``status="skipped_budget"``; a method that raises gets
    ``status="error"`` and its message, so one failure does not lose the table.
    """
    device = torch.device(device)
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise ValueError(f"unknown dtypes {sorted(unknown)}; expected some of {list(DTYPES)}")
    triton_function, triton_version = _triton_function(device)
    compiled = _compiled_reference() if compile_reference else None
    header = {"device": device_slug(device), "torch": torch.__version__, "triton": triton_version,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()}
    phases = ("eager", "compiled") if compiled is not None else ("eager",)
    combos = [(p, d, s, r) for p in phases for d in dtypes for s in shapes for r in ranks]
    floors: dict[tuple, float] = {}
    rows: list[dict] = []
    start = time.monotonic()
    for phase, dtype_name, shape, rank in tqdm(combos, desc="kernel benchmark", disable=not progress):
        tokens, out_f, in_f = shape.tokens, shape.out_features, shape.in_features
        base = {**header, "dtype": dtype_name, "shape": shape.name, "tokens": tokens, "out": out_f, "in": in_f,
                "rank": rank}
        t = make_inputs(tokens, out_f, in_f, rank, DTYPES[dtype_name], device)
        methods, leaves = build_methods(t, triton_function if phase == "eager" else None,
                                        compiled if phase == "compiled" else None)
        if phase == "compiled":
            methods = {"reference_compiled": methods["reference_compiled"]}
        key = (dtype_name, shape.name, rank)
        if phase == "eager":
            floors[key] = median_ms(floor_step(t), iters, warmup, device)
            rows.append({**base, "method": "floor", "status": "ok", "fwd_bwd_ms": round(floors[key], 4),
                         "ratio_to_floor": 1.0, "note": "sum of the six irreducible GEMMs"})
        expected = _grads(methods["reference"][0], t) if "reference" in methods else None
        for name, (forward, frozen) in methods.items():
            row = {**base, "method": name}
            if time.monotonic() - start > budget_s:
                rows.append({**row, "status": "skipped_budget"})
                continue
            try:
                def step(forward=forward):
                    for leaf in leaves:
                        leaf.grad = None
                    forward().backward(t["dy"])

                if name.startswith("triton"):
                    row["max_rel_err_vs_reference"] = float(f"{max_rel_err(_grads(forward, t), expected):.3e}")
                    if device.type != "cuda":
                        row["note"] = "Triton interpreter: the time is not a speed"
                ms = median_ms(step, iters, warmup, device)
                with torch.no_grad():
                    fwd = median_ms(forward, iters, warmup, device)
                row.update(status="ok", fwd_bwd_ms=round(ms, 4), fwd_ms=round(fwd, 4),
                           ratio_to_floor=round(ms / floors[key], 4))
                peak = peak_extra_mib(step, device)
                if peak is not None:
                    row["peak_extra_mib"] = round(peak, 3)
                if name != "reference_compiled":  # saved-tensor hooks would make dynamo fall back to eager
                    saved = saved_for_backward_bytes(forward, frozen, t["dy"])
                    row["saved_for_backward_mib"] = round(saved / 2**20, 6)
            except Exception as exc:  # noqa: BLE001 - one failing method must not lose the table
                row.update(status="error", note=repr(exc)[:300])
            rows.append(row)
        if triton_function is not None:
            triton_function.blocks = None
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write :func:`run_kernel_benchmark` rows as CSV (columns :data:`FIELDS`) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def load_kernel_benchmarks(folder: Path | str, include_quick: bool = False) -> pd.DataFrame:
    """Every ``benchmarks_kernels_<device>.csv`` in ``folder`` as one DataFrame (empty, with :data:`FIELDS`, if
    none)."""
    paths = sorted(p for p in Path(folder).glob("benchmarks_kernels_*.csv")
                   if include_quick or "_quick" not in p.stem)
    if not paths:
        return pd.DataFrame(columns=FIELDS)
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def best_triton_tiles(df: pd.DataFrame) -> pd.DataFrame:
    """The measured rows (``status == "ok"``) with a ``family`` column; of the Triton tile configs only the fastest
    per (device, dtype, shape, rank) is kept, its family ``triton`` (every other family is its method)."""
    df = df.reindex(columns=FIELDS)  # rows straight from run_kernel_benchmark may lack optional columns
    ok = df[df["status"] == "ok"].copy()
    ok["family"] = ok["method"].where(~ok["method"].str.startswith("triton_"), "triton")
    key = ["device", "dtype", "shape", "rank", "family"]
    return ok.sort_values("fwd_bwd_ms").groupby(key, sort=False).head(1).sort_index()


def summarise_kernel_benchmark(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (device, dtype, shape, rank): the best Triton tile config against the floor and the others.

    Returns columns floor_ms, triton_ms, triton_tiles, reference_ms, reference_compiled_ms, official_hook_ms,
    frozen_linear_ms, full_ft_linear_ms, triton_vs_floor, speedup_vs_hook, speedup_vs_reference, triton_saved_mib,
    hook_saved_mib, triton_max_rel_err, and whether the Triton row meets the bounds: triton_vs_floor_within_bound
    (≤ :data:`MAX_TRITON_TIME_VS_FLOOR`), speedup_vs_hook_within_bound (≥ :data:`MIN_TRITON_SPEEDUP_VS_HOOK`); NaN
    where no Triton row was measured, e.g. on CPU.
    """
    key = ["device", "dtype", "shape", "rank"]
    best = best_triton_tiles(df)
    summary = (best.pivot_table(index=key, columns="family", values="fwd_bwd_ms", sort=False)
               .reindex(columns=FAMILIES)  # a family without rows (Triton on CPU) gets a NaN column
               .rename(columns=lambda c: f"{c}_ms").rename_axis(columns=None))
    triton = best[best["family"] == "triton"].set_index(key)
    hook = best[best["family"] == "official_hook"].set_index(key)
    summary["triton_tiles"] = triton["method"].str.removeprefix("triton_")
    summary["triton_max_rel_err"] = triton["max_rel_err_vs_reference"]
    summary["triton_vs_floor"] = summary["triton_ms"] / summary["floor_ms"]
    summary["speedup_vs_hook"] = summary["official_hook_ms"] / summary["triton_ms"]
    summary["speedup_vs_reference"] = summary["reference_ms"] / summary["triton_ms"]
    summary["triton_saved_mib"] = triton["saved_for_backward_mib"]
    summary["hook_saved_mib"] = hook["saved_for_backward_mib"]
    measured = summary["triton_ms"].notna()
    within_floor_bound = summary["triton_vs_floor"] <= MAX_TRITON_TIME_VS_FLOOR
    within_hook_bound = summary["speedup_vs_hook"] >= MIN_TRITON_SPEEDUP_VS_HOOK
    summary["triton_vs_floor_within_bound"] = within_floor_bound.where(measured)
    summary["speedup_vs_hook_within_bound"] = within_hook_bound.where(measured)
    order = pd.MultiIndex.from_frame(best[key].drop_duplicates())  # the benchmark's order of combinations
    return summary.reindex(index=order, columns=SUMMARY_COLUMNS).reset_index()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks kernels``."""
    parser.add_argument("--out", type=Path, default=Path("results") / "tables", help="folder of the CSV")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible) | cuda | cpu")
    parser.add_argument("--dtypes", help="comma-separated of fp32,fp16,bf16 (default: fp16,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--ranks", default="64,256", help="comma-separated LoRaD ranks")
    parser.add_argument("--shapes", default="all", help="comma-separated names of SD15_LINEAR_SHAPES, or 'all'")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per method, median reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop measuring after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny ragged shapes, rank {QUICK_RANK}, one timed call; *_quick.csv")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the summary, write ``<out>/benchmarks_kernels_<device>[_quick].csv``."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    dtypes = tuple((args.dtypes or ("fp16,bf16" if device.type == "cuda" else "fp32")).split(","))
    if args.quick:
        shapes, ranks, iters, warmup = QUICK_LINEAR_SHAPES, (QUICK_RANK,), 1, 1
    else:
        try:
            shapes = SD15_LINEAR_SHAPES if args.shapes == "all" else sd15_shapes(args.shapes.split(","))
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
        ranks, iters, warmup = tuple(int(r) for r in args.ranks.split(",")), args.iters, args.warmup
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs (A·B, dΘ·Bᵀ, Aᵀ·dΘ) as the kernels do them
    rows = run_kernel_benchmark(device, dtypes, shapes, ranks, iters, warmup, args.budget_s,
                                compile_reference=not args.no_compile)
    name = f"benchmarks_kernels_{device_slug(device)}{'_quick' if args.quick else ''}.csv"
    path = write_rows(rows, args.out / name)
    summary = summarise_kernel_benchmark(pd.DataFrame(rows))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summary.round(3).to_string(index=False))
    print(f"wrote {path} ({len(rows)} rows)")
    return 0
