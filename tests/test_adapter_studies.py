"""Notebook 02's studies: property checks, synthetic direction targets, expressivity fits, count table."""

import pytest
import torch
from torch import nn

from wadi_core.adapters.expressivity import (
    TARGET_KINDS,
    direction_residual_target,
    effective_weight,
    fit_adapter,
    mean_direction_change,
)
from wadi_core.adapters.lora import LoRALinear
from wadi_core.adapters.properties import check_lorad_properties
from wadi_core.backbones.counts import parameter_count_table


def test_every_lorad_property_holds_on_a_random_layer():
    torch.manual_seed(0)
    table = check_lorad_properties(nn.Linear(16, 8), rank=3, seed=1)
    assert table["holds"].all(), table[~table["holds"]]


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_targets_keep_norms_and_reach_the_direction_change(kind):
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    target = direction_residual_target(weight, kind, 0.02, 0.1, seed=3)
    torch.testing.assert_close(target.norm(dim=1), weight.norm(dim=1), atol=1e-5, rtol=1e-5)
    assert mean_direction_change(weight, target) == pytest.approx(0.02, rel=1e-4)
    with pytest.raises(ValueError, match="additive, rotation"):
        direction_residual_target(weight, "shear", 0.02, 0.1, seed=3)


def test_effective_weight_is_the_merged_weight():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(effective_weight(layer), expected)


def test_each_family_fits_its_own_target_at_its_rank():
    torch.manual_seed(0)
    weight = torch.randn(16, 32) / 4
    rotation = direction_residual_target(weight, "rotation", 0.02, 0.1, seed=0)  # rank 2 angles
    additive = direction_residual_target(weight, "additive", 0.02, 0.1, seed=0)
    lorad = fit_adapter(weight, rotation, "lorad", rank=4, steps=300, lr=1e-2, seed=0)
    lora_on_rotation = fit_adapter(weight, rotation, "lora", rank=2, steps=300, lr=1e-2, seed=0)
    dora = fit_adapter(weight, additive, "dora_frozen_norm", rank=4, steps=300, lr=1e-2, seed=0)
    assert lorad["relative error"] < 0.05 and dora["relative error"] < 0.05
    assert lora_on_rotation["relative error"] > 0.3
    assert lorad["row-norm change"] < 1e-6  # rotations never change a row norm
    assert lorad["params"] == 4 * (16 + 16)
    with pytest.raises(ValueError, match="unknown method"):
        fit_adapter(weight, rotation, "oft", rank=2, steps=1, lr=1e-2, seed=0)


def test_count_table_matches_the_paper_except_pixart_student_rule():
    table = parameter_count_table()
    reported = table.dropna(subset=["paper (M)"])
    mismatches = reported.index[~reported["matches paper"].astype(bool)].tolist()
    assert mismatches == ["Table 1: WaDi on PixArt-α (student rule)"]
    assert table.loc["Table 1: WaDi on SD1.5", "trainable (exact)"] == 83_795_968


def test_count_adapter_parameters_counts_a_model_without_touching_it():
    from wadi_core.backbones.counts import count_adapter_parameters

    model = nn.Sequential()
    model.add_module("down_blocks", nn.Sequential(nn.Linear(8, 4), nn.Conv2d(2, 2, 1)))
    layers, trainable, total = count_adapter_parameters(model, "lorad", rank=2)
    assert (layers, trainable, total) == (1, 4 * 2 + 2 * 4, sum(p.numel() for p in model.parameters()))
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Conv2d) for m in model.modules())  # the model is not adapted
