"""The LoRaD cost benchmark (issue 3): the official-hook baseline is faithful, and the benchmark measures what it
says (fields, saved-for-backward bytes, tables). Behaviour only; timings are never asserted."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wadi_core import bench
from wadi_core.adapters import LoRaDLinear, lorad_rotate
from wadi_core.adapters.official_hook import OfficialHookLoRaD

ROW_FIELDS = {
    "kind", "shape", "in_features", "out_features", "tokens", "rank", "dtype", "time_ms", "saved_bytes",
    "trainable_params",
}


def _pair(in_features: int = 8, out_features: int = 6, rank: int = 3) -> tuple[OfficialHookLoRaD, LoRaDLinear]:
    """The official hook and our LoRaDLinear on copies of one Linear, with the same non-zero θ."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    official = OfficialHookLoRaD(nn.Linear(in_features, out_features), rank)
    official.base.load_state_dict(base.state_dict(), strict=False)
    ours = LoRaDLinear(base, rank)
    with torch.no_grad():
        official.base.theta_a.normal_()
        ours.theta_a.copy_(official.base.theta_a)
        ours.theta_b.copy_(official.base.theta_b)
    return official, ours


def test_official_hook_output_is_linear_with_rotated_weight():
    official, _ = _pair()
    layer = official.base
    x = torch.randn(5, 8)
    expected = F.linear(x, lorad_rotate(layer.weight, layer.theta_a, layer.theta_b), layer.bias)
    torch.testing.assert_close(official(x), expected)


def test_official_hook_gradients_match_lorad_linear():
    official, ours = _pair()
    x = torch.randn(2, 5, 8)
    grad_out = torch.randn(2, 5, 6)
    official(x).backward(grad_out)
    ours(x).backward(grad_out)
    torch.testing.assert_close(official.base.theta_a.grad, ours.theta_a.grad)
    torch.testing.assert_close(official.base.theta_b.grad, ours.theta_b.grad)


def test_official_hook_is_identity_at_init_and_trains_only_theta():
    torch.manual_seed(0)
    layer = OfficialHookLoRaD(nn.Linear(8, 4), rank=2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight, layer.base.bias))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"base.theta_a", "base.theta_b"}


def test_official_hook_rejects_odd_in_features():
    with pytest.raises(ValueError, match="in_features must be even"):
        OfficialHookLoRaD(nn.Linear(7, 4), rank=2)


@pytest.mark.parametrize("kind", bench.ALL_KINDS)
def test_benchmark_linear_returns_every_field(kind):
    row = bench.benchmark_linear(kind, 16, 8, 32, rank=2, repeats=1, warmup=0)
    assert set(row) == ROW_FIELDS
    assert row["kind"] == kind
    assert row["time_ms"] > 0
    assert row["saved_bytes"] >= 0


def test_trainable_params_follow_each_method():
    counts = {kind: bench.benchmark_linear(kind, 16, 8, 4, rank=2, repeats=1)["trainable_params"] for kind in
              ("lorad", "official_hook", "frozen_linear", "full_ft_linear")}
    assert counts == {"lorad": 2 * (8 + 16 // 2), "official_hook": 2 * (8 + 16 // 2), "frozen_linear": 0,
                      "full_ft_linear": 16 * 8 + 8}


def test_official_hook_keeps_out_by_in_tensors_and_lorad_does_not():
    official = bench.benchmark_linear("official_hook", 128, 128, 32, rank=2, repeats=1)["saved_bytes"]
    ours = bench.benchmark_linear("lorad", 128, 128, 32, rank=2, repeats=1)["saved_bytes"]
    assert official >= 128 * 128 * 4  # at least the materialised fp32 W_rot
    assert ours <= 2 * (128 + 128) * 4  # O(r·(out + in)) at most
    assert ours < official


def test_frozen_linear_saves_nothing_beyond_x_and_its_weight():
    assert bench.benchmark_linear("frozen_linear", 32, 16, 8, repeats=1)["saved_bytes"] == 0


def test_summary_divides_by_the_official_hook_at_the_same_shape():
    df = pd.DataFrame(
        {
            "kind": ["official_hook", "lorad", "official_hook", "lorad"],
            "shape": ["a", "a", "b", "b"],
            "time_ms": [10.0, 5.0, 10.0, 9.0],
            "saved_bytes": [1000, 0, 1000, 500],
        }
    )
    summary = bench.summarise_lorad_benchmark(df).xs("lorad", level="kind")
    assert summary["time_ratio"].tolist() == [0.5, 0.9]
    assert summary["saved_ratio"].tolist() == [0.0, 0.5]
    assert summary["time_target_met"].tolist() == [True, False]
    assert summary["saved_target_met"].tolist() == [True, False]


def test_cli_quick_writes_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path))
    assert bench.main(["lorad", "--quick"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "lorad_bench_quick.csv")
    assert set(table["kind"]) == set(bench.ALL_KINDS)
    assert len(table) == len(bench.QUICK_SHAPES) * len(bench.ALL_KINDS)
    assert (tmp_path / "tables" / "lorad_bench_quick_summary.md").exists()
    assert "threads" in capsys.readouterr().out


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["conv"])
    assert exit_info.value.code == 2
