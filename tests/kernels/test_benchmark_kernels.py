"""The kernel benchmark (``python -m wadi_core.benchmarks kernels``) on CPU: every method measured, the Triton rows
checked against the reference in the interpreter, saved-for-backward bytes exact, the summary's bounds, the CSV files.

Times are never asserted; shapes are the ragged quick ones (seconds in Triton's interpreter).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("triton")

from wadi_core.benchmarks import QUICK_LINEAR_SHAPES, QUICK_RANK, saved_for_backward_bytes  # noqa: E402
from wadi_core.benchmarks import kernels as bench  # noqa: E402
from wadi_core.benchmarks.__main__ import main  # noqa: E402

QUICK = QUICK_LINEAR_SHAPES
RANK = QUICK_RANK
ALL_METHODS = {"floor", "reference", "official_hook", "frozen_linear", "full_ft_linear",
               *(f"triton_{name}" for name in bench.TRITON_CONFIGS)}


@pytest.fixture(scope="module")
def quick_rows():
    return bench.run_kernel_benchmark("cpu", ("fp32", "fp16"), QUICK, (RANK,), iters=1, warmup=0,
                                      compile_reference=False, progress=False)


def test_every_method_is_measured_at_every_shape(quick_rows):
    df = pd.DataFrame(quick_rows)
    assert set(df["status"]) == {"ok"}, df[df["status"] != "ok"][["method", "note"]]
    for (dtype, shape), group in df.groupby(["dtype", "shape"]):
        assert set(group["method"]) == ALL_METHODS, (dtype, shape)
    assert set(df.columns) <= set(bench.FIELDS)
    assert (df["fwd_bwd_ms"].astype(float) > 0).all()


def test_triton_rows_match_the_reference(quick_rows):
    df = pd.DataFrame(quick_rows)
    triton = df[df["method"].str.startswith("triton_")]
    assert len(triton) == 2 * len(QUICK) * len(bench.TRITON_CONFIGS)
    tolerance = triton["dtype"].map({"fp32": 1e-4, "fp16": 1e-2})
    assert (triton["max_rel_err_vs_reference"].astype(float) <= tolerance).all()
    assert triton["note"].str.contains("interpreter").all()


@pytest.mark.parametrize("method", ["reference", "triton_64x64x32_w4"])
def test_lorad_saves_only_the_factors(method):
    """LoRaD's saved-for-backward memory beyond x and W is exactly A (out×r) and B (r×in/2), fp32."""
    shape = QUICK[0]
    out_f, in_f = shape.out_features, shape.in_features
    t = bench.make_inputs(shape.tokens, out_f, in_f, RANK, torch.float32, torch.device("cpu"))
    from wadi_core.kernels.lorad_triton import TritonLoRaDFunction

    methods, _ = bench.build_methods(t, TritonLoRaDFunction, None)
    forward, frozen = methods[method]
    assert saved_for_backward_bytes(forward, frozen, t["dy"]) == 4 * (out_f * RANK + RANK * in_f // 2)
    hook_forward, hook_frozen = methods["official_hook"]
    assert saved_for_backward_bytes(hook_forward, hook_frozen, t["dy"]) > 4 * out_f * in_f
    frozen_forward, frozen_tensors = methods["frozen_linear"]
    assert saved_for_backward_bytes(frozen_forward, frozen_tensors, t["dy"]) == 0


def test_summary_ratios_and_bounds(quick_rows):
    summary = bench.summarise_kernel_benchmark(pd.DataFrame(quick_rows))
    assert list(summary.columns) == ["device", "dtype", "shape", "rank", *bench.SUMMARY_COLUMNS]
    assert len(summary) == 2 * len(QUICK)
    row = summary.iloc[0]
    assert row["triton_vs_floor"] == pytest.approx(row["triton_ms"] / row["floor_ms"])
    assert row["speedup_vs_hook"] == pytest.approx(row["official_hook_ms"] / row["triton_ms"])
    assert row["triton_tiles"] in bench.TRITON_CONFIGS
    assert row["triton_vs_floor_within_bound"] == (row["triton_vs_floor"] <= bench.MAX_TRITON_TIME_VS_FLOOR)
    assert row["speedup_vs_hook_within_bound"] == (row["speedup_vs_hook"] >= bench.MIN_TRITON_SPEEDUP_VS_HOOK)


def test_cpu_without_interpreter_has_no_triton_rows(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = bench.run_kernel_benchmark("cpu", ("fp32",), QUICK[:1], (RANK,), iters=1, warmup=0,
                                      compile_reference=False, progress=False)
    assert not any(row["method"].startswith("triton") for row in rows)
    assert rows[0]["triton"].startswith("not run")
    summary = bench.summarise_kernel_benchmark(pd.DataFrame(rows))
    assert summary["triton_ms"].isna().all() and summary["triton_vs_floor_within_bound"].isna().all()
    assert summary["official_hook_ms"].notna().all()


def test_budget_marks_rows_skipped():
    rows = bench.run_kernel_benchmark("cpu", ("fp32",), QUICK[:1], (RANK,), iters=1, warmup=0, budget_s=-1.0,
                                      compile_reference=False, progress=False)
    assert {row["status"] for row in rows if row["method"] != "floor"} == {"skipped_budget"}


def test_cli_writes_quick_csv_that_loading_skips_by_default(tmp_path):
    assert main(["kernels", "--quick", "--device", "cpu", "--no-compile", "--out", str(tmp_path)]) == 0
    path = tmp_path / "benchmarks_kernels_cpu_quick.csv"
    written = pd.read_csv(path)
    assert list(written.columns) == bench.FIELDS
    assert bench.load_kernel_benchmarks(tmp_path).empty
    assert len(bench.load_kernel_benchmarks(tmp_path, include_quick=True)) == len(written)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dtypes"):
        bench.run_kernel_benchmark("cpu", ("fp64",), QUICK, (RANK,), progress=False)
    assert main(["kernels", "--device", "cpu", "--shapes", "not_a_shape"]) == 2
