"""The benchmarks' shared measuring core: the SD1.5 shape table, the interleaved timer and the saved-for-backward
counter. Timings are never asserted, only what is timed and in which order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from wadi_core.benchmarks import (
    SD15_LINEAR_SHAPES,
    LinearShape,
    median_ms,
    saved_for_backward_bytes,
    sd15_shapes,
    time_ms,
)


def test_sd15_shapes_are_the_unet_linears_at_512px_under_cfg():
    by_name = {shape.name: shape for shape in SD15_LINEAR_SHAPES}
    assert len(by_name) == len(SD15_LINEAR_SHAPES) == 11
    assert all(shape.batch == 2 and shape.in_features % 2 == 0 for shape in SD15_LINEAR_SHAPES)
    assert {shape.sequence for shape in SD15_LINEAR_SHAPES} == {4096, 1024, 256, 64, 77}
    geglu = by_name["ff_geglu_in_640"]
    assert (geglu.tokens, geglu.out_features, geglu.in_features) == (2048, 5120, 640)
    assert geglu.label == "GEGLU 640→5120, 2×1024 tokens"
    assert LinearShape("q", "square", 1, 37, 8, 8).label == "square 8×8, 37 tokens"


def test_sd15_shapes_picks_by_name_in_order_and_names_unknown_ones():
    assert [s.name for s in sd15_shapes(["xattn_kv_320", "attn_qkvo_320"])] == ["xattn_kv_320", "attn_qkvo_320"]
    with pytest.raises(ValueError, match="not_a_shape"):
        sd15_shapes(["attn_qkvo_320", "not_a_shape"])


def test_time_ms_interleaves_calls_after_warmup():
    order = []
    times = time_ms({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    calls = []
    assert median_ms(lambda: calls.append(1), repeats=2, warmup=0) >= 0 and len(calls) == 2


def test_saved_bytes_count_each_storage_once_and_skip_excluded():
    weight = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    hidden_bytes = 3 * 8 * 4

    def forward():
        hidden = x @ weight.T  # saves x and weight
        return (hidden * hidden).sum() + hidden.sin().sum()  # saves hidden (once, twice used)

    assert saved_for_backward_bytes(forward, [x, weight]) == hidden_bytes
    assert saved_for_backward_bytes(forward, [weight]) == hidden_bytes + x.numel() * 4
    assert weight.grad is not None  # the backward pass that frees the graph ran
    with torch.no_grad():
        assert saved_for_backward_bytes(forward) == 0


def test_measure_and_kernels_import_neither_diffusers_nor_transformers():
    """The kernel benchmark and its command line run on GPU machines that carry torch and triton only."""
    code = ("import sys; import wadi_core.benchmarks.kernels; from wadi_core.benchmarks.__main__ import build_parser; "
            "build_parser(['kernels']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'diffusers', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
