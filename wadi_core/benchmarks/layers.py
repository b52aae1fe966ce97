"""Per-layer cost of LoRaD against the official hook, LoRA, DoRA and plain Linears (WaDi §3.2).

``python -m wadi_core.benchmarks layers`` measures, per adapted Linear at SD1.5 shapes,

- the forward+backward wall time (median over repeats, :func:`~.measure.time_ms`),
- the bytes the autograd graph keeps for backward, beyond the input x and the layer's own parameters and buffers
  (:func:`~.measure.saved_for_backward_bytes`). Summed over a whole U-Net these bytes, not one layer's peak, are
  what the official hook (``hook_fn`` in ``train_dkd_sd.py``) costs in memory
  (``docs/paper_notes.md#cost-of-the-official-hook``),
- the number of trainable parameters.

Kinds (:data:`LAYER_KINDS`): ``lorad`` (our :class:`~wadi_core.adapters.LoRaDLinear`), ``official_hook``
(:class:`~wadi_core.adapters.official_hook.OfficialHookLoRaD`), ``lora``, ``dora``, and the floors
``frozen_linear`` (weight frozen, x still requires grad) and ``full_ft_linear`` (every parameter trainable).

Tables: ``results/tables/benchmarks_layers.{csv,md,tex}`` and ``benchmarks_layers_summary.*`` (``--quick``: small
shapes, tables ``*_quick``).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..adapters import DoRALinear, LoRaDLinear, LoRALinear
from ..adapters.official_hook import OfficialHookLoRaD
from ..reporting import save_table
from .measure import (
    QUICK_LINEAR_SHAPES,
    QUICK_RANK,
    LinearShape,
    environment_header,
    saved_for_backward_bytes,
    sd15_shapes,
    time_ms,
)

# Four SD1.5 Linears that span the U-Net: token-heavy self-attention, the widest feed-forward, the deepest
# attention, and cross-attention over the 77 text tokens.
LAYER_SHAPES: tuple[LinearShape, ...] = sd15_shapes(("attn_qkvo_320", "ff_geglu_in_640", "attn_qkvo_1280",
                                                     "xattn_kv_320"))
LAYER_KINDS: tuple[str, ...] = ("lorad", "official_hook", "lora", "dora", "frozen_linear", "full_ft_linear")
# What our LoRaD must stay within at every shape, relative to the official hook: the hook runs the Linear twice
# and keeps W' (out×in) and more for backward, LoRaD runs it once and keeps only A and B.
MAX_TIME_VS_OFFICIAL_HOOK = 0.8
MAX_SAVED_VS_OFFICIAL_HOOK = 0.1


def build_layer(kind: str, in_features: int, out_features: int, rank: int, dtype: torch.dtype) -> nn.Module:
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
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(LAYER_KINDS)}")


def benchmark_shape(
    shape: LinearShape,
    kinds: tuple[str, ...] = LAYER_KINDS,
    rank: int = 256,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Time, saved-for-backward bytes and trainable parameters of each kind at one shape, one row per kind.

    The input x (tokens×in) requires grad in every kind, as inside a U-Net whose earlier layers are adapted. Each
    timed pass resets the gradients, then runs forward and backward; the kinds are timed interleaved.

    Returns:
        Rows: kind, shape (its label), in_features, out_features, tokens, rank, dtype, time_ms, saved_bytes,
        trainable_params.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.randn(shape.tokens, shape.in_features, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(shape.tokens, shape.out_features, dtype=dtype)
        layers = {kind: build_layer(kind, shape.in_features, shape.out_features, rank, dtype) for kind in kinds}

    def forward_backward(layer: nn.Module):
        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad_out)

        return run

    times = time_ms({kind: forward_backward(layer) for kind, layer in layers.items()}, repeats, warmup)
    description = {"shape": shape.label, "in_features": shape.in_features, "out_features": shape.out_features,
                   "tokens": shape.tokens, "rank": rank, "dtype": str(dtype).removeprefix("torch.")}
    return [
        {
            "kind": kind,
            **description,
            "time_ms": times[kind],
            "saved_bytes": saved_for_backward_bytes(lambda layer=layer: layer(x),
                                                    [x, *layer.parameters(), *layer.buffers()], grad_out),
            "trainable_params": sum(p.numel() for p in layer.parameters() if p.requires_grad),
        }
        for kind, layer in layers.items()
    ]


def run_layer_benchmark(
    shapes: tuple[LinearShape, ...] = LAYER_SHAPES,
    kinds: tuple[str, ...] = LAYER_KINDS,
    rank: int = 256,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`benchmark_shape` at every shape; one row per (shape, kind)."""
    rows = []
    for shape in tqdm(shapes, desc="layer benchmark", disable=not progress):
        rows += benchmark_shape(shape, kinds, rank, dtype, repeats)
    return pd.DataFrame(rows)


def summarise_layer_benchmark(df: pd.DataFrame) -> pd.DataFrame:
    """Every kind's time and saved bytes relative to the official hook at the same shape.

    The bounds are :data:`MAX_TIME_VS_OFFICIAL_HOOK` and :data:`MAX_SAVED_VS_OFFICIAL_HOOK`, set for our LoRaD;
    the other kinds' rows say how they would fare against the same bar.

    Returns:
        One row per (shape, kind ≠ official_hook), in the input's order: time_ms, time_ratio, saved_MiB,
        saved_ratio, time_ratio_within_bound, saved_ratio_within_bound.
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
            "time_ratio_within_bound": time_ratio <= MAX_TIME_VS_OFFICIAL_HOOK,
            "saved_ratio_within_bound": saved_ratio <= MAX_SAVED_VS_OFFICIAL_HOOK,
        }
    )
    return summary.set_index(["shape", "kind"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks layers``."""
    parser.add_argument("--repeats", type=int, help="timed passes per layer, median reported (default 5; quick 1)")
    parser.add_argument("--rank", type=int, help=f"adapter rank (default 256; quick {QUICK_RANK})")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests; tables *_quick")


def main(args: argparse.Namespace) -> int:
    """Run the layer benchmark, print the table and the summary, save both."""
    shapes, stem = (QUICK_LINEAR_SHAPES, "benchmarks_layers_quick") if args.quick else (LAYER_SHAPES,
                                                                                          "benchmarks_layers")
    rank = args.rank or (QUICK_RANK if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 5)
    header = f"{environment_header()}; rank {rank}, float32, median of {repeats}"
    print(header)
    df = run_layer_benchmark(shapes, rank=rank, repeats=repeats)
    summary = summarise_layer_benchmark(df)
    lorad = summary.xs("lorad", level="kind")
    print(df.to_string(index=False, float_format="{:.4g}".format))
    print(summary.to_string(float_format="{:.3g}".format))
    print(f"LoRaD vs official hook: time ≤ {MAX_TIME_VS_OFFICIAL_HOOK}× at every shape: "
          f"{bool(lorad['time_ratio_within_bound'].all())}; saved bytes ≤ {MAX_SAVED_VS_OFFICIAL_HOOK}× at every "
          f"shape: {bool(lorad['saved_ratio_within_bound'].all())}")
    save_table(df, stem, caption=f"Per-layer forward+backward cost ({header})")
    save_table(summary, f"{stem}_summary", caption=f"Relative to the official LoRaD hook ({header})")
    return 0
