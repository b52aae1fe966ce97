"""The layer benchmark (``python -m wadi_core.benchmarks layers``): the official-hook baseline is faithful, and the
benchmark measures what it says (fields, saved-for-backward bytes, tables). Behaviour only; timings are never
asserted."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wadi_core.adapters import LoRaDLinear, lorad_rotate
from wadi_core.adapters.official_hook import OfficialHookLoRaD
from wadi_core.benchmarks import QUICK_LINEAR_SHAPES, QUICK_RANK, LinearShape, layers
from wadi_core.benchmarks.__main__ import main

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


def measure(kind: str, in_features: int, out_features: int, tokens: int, rank: int = 2) -> dict:
    shape = LinearShape("test", "test", 1, tokens, out_features, in_features)
    return layers.benchmark_shape(shape, (kind,), rank=rank, repeats=1, warmup=0)[0]


@pytest.mark.parametrize("kind", layers.LAYER_KINDS)
def test_benchmark_shape_returns_every_field(kind):
    row = measure(kind, 16, 8, 32)
    assert set(row) == ROW_FIELDS
    assert row["kind"] == kind and row["shape"] == "test 16→8, 32 tokens"
    assert row["time_ms"] > 0
    assert row["saved_bytes"] >= 0


def test_trainable_params_follow_each_method():
    counts = {kind: measure(kind, 16, 8, 4)["trainable_params"] for kind in
              ("lorad", "official_hook", "frozen_linear", "full_ft_linear")}
    assert counts == {"lorad": 2 * (8 + 16 // 2), "official_hook": 2 * (8 + 16 // 2), "frozen_linear": 0,
                      "full_ft_linear": 16 * 8 + 8}


def test_official_hook_keeps_out_by_in_tensors_and_lorad_does_not():
    official = measure("official_hook", 128, 128, 32)["saved_bytes"]
    ours = measure("lorad", 128, 128, 32)["saved_bytes"]
    assert official >= 128 * 128 * 4  # at least the materialised fp32 W_rot
    assert ours <= 2 * (128 + 128) * 4  # O(r·(out + in)) at most
    assert ours < official


def test_frozen_linear_saves_nothing_beyond_x_and_its_weight():
    assert measure("frozen_linear", 32, 16, 8)["saved_bytes"] == 0


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown kind"):
        layers.build_layer("conv", 4, 4, 1, torch.float32)


def test_summary_divides_by_the_official_hook_at_the_same_shape():
    df = pd.DataFrame(
        {
            "kind": ["official_hook", "lorad", "official_hook", "lorad"],
            "shape": ["a", "a", "b", "b"],
            "time_ms": [10.0, 5.0, 10.0, 9.0],
            "saved_bytes": [1000, 0, 1000, 500],
        }
    )
    summary = layers.summarise_layer_benchmark(df).xs("lorad", level="kind")
    assert summary["time_ratio"].tolist() == [0.5, 0.9]
    assert summary["saved_ratio"].tolist() == [0.0, 0.5]
    assert summary["time_ratio_within_bound"].tolist() == [True, False]
    assert summary["saved_ratio_within_bound"].tolist() == [True, False]


def test_layer_shapes_keep_their_table_labels():
    assert [shape.label for shape in layers.LAYER_SHAPES] == [
        "attn 320×320, 2×4096 tokens", "GEGLU 640→5120, 2×1024 tokens", "attn 1280×1280, 2×256 tokens",
        "cross-attn k/v 768→320, 2×77 tokens"]


def test_cli_quick_writes_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path))
    assert main(["layers", "--quick"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "benchmarks_layers_quick.csv")
    assert set(table["kind"]) == set(layers.LAYER_KINDS)
    assert len(table) == len(QUICK_LINEAR_SHAPES) * len(layers.LAYER_KINDS)
    assert (table["rank"] == QUICK_RANK).all()
    assert (tmp_path / "tables" / "benchmarks_layers_quick_summary.md").exists()
    assert "threads" in capsys.readouterr().out


def test_cli_rejects_unknown_benchmark():
    with pytest.raises(SystemExit) as exit_info:
        main(["conv"])
    assert exit_info.value.code == 2
