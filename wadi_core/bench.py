"""Per-layer cost of LoRaD against the official hook, LoRA, DoRA and plain Linears (issue 3, "Benchmark").

``make bench`` runs ``python -m wadi_core.bench lorad``. At SD1.5 Linear shapes it measures, per adapted layer,

- the forward+backward wall time (median over repeats, ``time.perf_counter``), and
- the bytes the autograd graph keeps for backward, excluding the input activation x and the module's own
  parameters and buffers (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once). Summed over a
  whole U-Net these bytes, not a single layer's peak, are what the official hook wastes (WADI_PAPER.md §3.5),

and the number of trainable parameters. Kinds (:data:`ALL_KINDS`): ``lorad`` (our
:class:`~wadi_core.adapters.LoRaDLinear`), ``official_hook`` (:class:`~wadi_core.adapters.official_hook.
OfficialHookLoRaD`), ``lora``, ``dora``, and the floors ``frozen_linear`` (weight frozen, x still requires grad)
and ``full_ft_linear`` (every parameter trainable). The issue's targets on CPU: our LoRaD takes ≤ 0.8× the
official hook's time and keeps ≤ 0.1× its saved bytes at every shape.

Tables go to ``results/tables/lorad_bench.{csv,md,tex}`` and ``lorad_bench_summary.{csv,md,tex}``
(``--quick``: ``lorad_bench_quick*``, small shapes, for smoke tests).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from wadi_core.adapters import DoRALinear, LoRALinear, LoRaDLinear
from wadi_core.adapters.official_hook import OfficialHookLoRaD
from wadi_core.reporting import save_table

# (name, in_features, out_features, tokens): SD1.5 Linears at 512², batch 2 (CFG), WADI_PAPER.md §3.2.
LORAD_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("attn 320×320, 2×4096 tokens", 320, 320, 8192),
    ("GEGLU 640→5120, 2×1024 tokens", 640, 5120, 2048),
    ("attn 1280×1280, 2×256 tokens", 1280, 1280, 512),
    ("cross-attn k/v 768→320, 2×77 tokens", 768, 320, 154),
)
# Small shapes for smoke runs and tests (seconds, not minutes).
QUICK_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("quick 64×64, 128 tokens", 64, 64, 128),
    ("quick 32→128, 64 tokens", 32, 128, 64),
)
QUICK_RANK = 8
ALL_KINDS: tuple[str, ...] = ("lorad", "official_hook", "lora", "dora", "frozen_linear", "full_ft_linear")
# Issue 3: our LoRaD against the official hook, per shape.
TIME_TARGET = 0.8
SAVED_TARGET = 0.1


def _build_layer(kind: str, in_features: int, out_features: int, rank: int, dtype: torch.dtype) -> nn.Module:
    """One layer of ``kind`` around a fresh ``nn.Linear(in_features, out_features)``."""
    base = nn.Linear(in_features, out_features, dtype=dtype)
    if kind == "lorad":
        return LoRaDLinear(base, rank)
    if kind == "official_hook":
        return OfficialHookLoRaD(base, rank)
    if kind == "lora":
        return LoRALinear(base, rank)
    if kind == "dora":
        return DoRALinear(base, rank)
    if kind == "frozen_linear":
        return base.requires_grad_(False)
    if kind == "full_ft_linear":
        return base
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@contextmanager
def count_saved_bytes(excluded: list[Tensor]) -> Iterator[dict[int, int]]:
    """Record ``{storage pointer: bytes}`` of every tensor autograd saves inside the block, minus ``excluded``."""
    skip = {_storage_key(t) for t in excluded}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in skip:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def _forward_backward_s(layer: nn.Module, x: Tensor, grad_out: Tensor) -> float:
    """One forward+backward pass (gradients reset first, untimed); its wall time in seconds."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    layer(x).backward(grad_out)
    return time.perf_counter() - start


def _saved_bytes(layer: nn.Module, x: Tensor, grad_out: Tensor) -> int:
    """Bytes autograd keeps for backward in one forward, without x and the layer's parameters and buffers."""
    excluded = [x, *layer.parameters(), *layer.buffers()]
    with count_saved_bytes(excluded) as saved:
        y = layer(x)
    y.backward(grad_out)  # frees the graph
    return sum(saved.values())


def benchmark_shape(
    kinds: tuple[str, ...],
    in_features: int,
    out_features: int,
    tokens: int,
    rank: int = 256,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    name: str | None = None,
) -> list[dict]:
    """:func:`benchmark_linear` for several kinds at one shape, one row per kind.

    The timed passes are interleaved (repeat 1 of every kind, then repeat 2, ...), so a burst of load from
    other processes slows every kind alike and the ratios to the official hook stay meaningful.
    """
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.randn(tokens, in_features, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(tokens, out_features, dtype=dtype)
        for kind in kinds:
            layers[kind] = _build_layer(kind, in_features, out_features, rank, dtype)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for step in range(warmup + repeats):
        for kind, layer in layers.items():
            elapsed = _forward_backward_s(layer, x, grad_out)
            if step >= warmup:
                times[kind].append(elapsed)
    shape = {
        "shape": name or f"{in_features}→{out_features}, {tokens} tokens",
        "in_features": in_features,
        "out_features": out_features,
        "tokens": tokens,
        "rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return [
        {
            "kind": kind,
            **shape,
            "time_ms": 1e3 * statistics.median(times[kind]),
            "saved_bytes": _saved_bytes(layer, x, grad_out),
            "trainable_params": sum(p.numel() for p in layer.parameters() if p.requires_grad),
        }
        for kind, layer in layers.items()
    ]


def benchmark_linear(
    kind: str,
    in_features: int,
    out_features: int,
    tokens: int,
    rank: int = 256,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    name: str | None = None,
) -> dict:
    """Time, saved-for-backward bytes and trainable parameters of one adapted Linear (issue 3, "Benchmark").

    The input x (tokens×in) requires grad in every kind, as inside a U-Net whose earlier layers are adapted.

    Args:
        kind: one of :data:`ALL_KINDS`.
        in_features, out_features: the Linear's shape.
        tokens: rows of x (batch × sequence length).
        rank: adapter rank r (ignored by the plain Linears).
        dtype: dtype of the Linear and of x (adapter angles stay fp32 in LoRaD).
        repeats: timed forward+backward passes; the median is reported (``time.perf_counter``).
        warmup: untimed passes first.
        seed: seeds the layer's initialisation, x and the output gradient.
        name: shape label for the row (default ``"in→out, tokens"``).

    Returns:
        A row: kind, shape, in_features, out_features, tokens, rank, dtype, time_ms, saved_bytes (kept for
        backward, excluding x and the layer's parameters and buffers), trainable_params.
    """
    return benchmark_shape((kind,), in_features, out_features, tokens, rank, dtype, repeats, warmup, seed, name)[0]


def run_lorad_benchmark(
    shapes: tuple[tuple[str, int, int, int], ...] = LORAD_SHAPES,
    kinds: tuple[str, ...] = ALL_KINDS,
    rank: int = 256,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`benchmark_shape` at every shape; one row per (shape, kind) (issue 3, "Benchmark")."""
    rows = []
    for name, in_features, out_features, tokens in tqdm(shapes, desc="lorad bench", disable=not progress):
        rows += benchmark_shape(kinds, in_features, out_features, tokens, rank, dtype, repeats, name=name)
    return pd.DataFrame(rows)


def summarise_lorad_benchmark(df: pd.DataFrame) -> pd.DataFrame:
    """Every kind's time and saved bytes relative to the official hook at the same shape, and the targets.

    The targets are issue 3's for our LoRaD (time ≤ 0.8×, saved bytes ≤ 0.1× the official hook's); the other
    kinds' rows say how they would fare against the same bar.

    Returns:
        One row per (shape, kind ≠ official_hook), in the input's order: time_ms, time_ratio, saved_MiB,
        saved_ratio, time_target_met, saved_target_met.
    """
    official = df[df["kind"] == "official_hook"].set_index("shape")
    others = df[df["kind"] != "official_hook"]
    time_ratio = others["time_ms"] / others["shape"].map(official["time_ms"])
    saved_ratio = others["saved_bytes"] / others["shape"].map(official["saved_bytes"])
    summary = pd.DataFrame(
        {
            "shape": others["shape"],
            "kind": others["kind"],
            "time_ms": others["time_ms"],
            "time_ratio": time_ratio,
            "saved_MiB": others["saved_bytes"] / 2**20,
            "saved_ratio": saved_ratio,
            "time_target_met": time_ratio <= TIME_TARGET,
            "saved_target_met": saved_ratio <= SAVED_TARGET,
        }
    )
    return summary.set_index(["shape", "kind"])


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment_header() -> str:
    """torch version, thread count and CPU model: what the timings depend on."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m wadi_core.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m wadi_core.bench",
        description="Per-layer forward+backward time and saved-for-backward bytes of the adapters (issue 3).",
    )
    parser.add_argument("benchmark", choices=["lorad"], help="which benchmark to run")
    parser.add_argument("--repeats", type=int, help="timed passes per layer, median reported (default 5; quick 1)")
    parser.add_argument("--rank", type=int, help=f"adapter rank (default 256; quick {QUICK_RANK})")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests; tables *_quick")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the LoRaD benchmark, print the table and the summary, save both; argument errors exit with 2."""
    args = build_parser().parse_args(argv)
    shapes, stem = (QUICK_SHAPES, "lorad_bench_quick") if args.quick else (LORAD_SHAPES, "lorad_bench")
    rank = args.rank or (QUICK_RANK if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 5)
    header = f"{environment_header()}; rank {rank}, float32, median of {repeats}"
    print(header)
    df = run_lorad_benchmark(shapes, rank=rank, repeats=repeats)
    summary = summarise_lorad_benchmark(df)
    lorad = summary.xs("lorad", level="kind")
    print(df.to_string(index=False, float_format="{:.4g}".format))
    print(summary.to_string(float_format="{:.3g}".format))
    print(
        f"LoRaD vs official hook: time ≤ {TIME_TARGET}× at every shape: {bool(lorad['time_target_met'].all())}; "
        f"saved bytes ≤ {SAVED_TARGET}× at every shape: {bool(lorad['saved_target_met'].all())}"
    )
    caption = f"Per-layer forward+backward cost ({header})"
    save_table(df, stem, caption=caption)
    save_table(summary, f"{stem}_summary", caption=f"Relative to the official LoRaD hook ({header})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
