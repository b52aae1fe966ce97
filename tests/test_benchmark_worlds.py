"""The worlds benchmark (``python -m wadi_core.benchmarks worlds``): its quick run writes one row per world with the
exact configs' counts, and the derived equal-budget columns follow from the measured ones. Timings are never
asserted."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel

from wadi_core.adapters import count_trainable, inject, linear_weight_share, select_layers
from wadi_core.backbones.tiny import teacher_unet_config
from wadi_core.benchmarks import worlds
from wadi_core.benchmarks.__main__ import main
from wadi_core.profiles import get_profile

WORLD_NAMES = ["pixel", "pixel_sd15_attention", "latent"]
COLUMNS = ["description", "input", "cross_attention_at", "params", "student_linear_share", "block_linear_share",
           "student_trainable", "teacher_batch", "vsd_batch", "threads", "teacher_step_ms", "vsd_step_ms",
           "teacher_cost_vs_latent", "teacher_steps_equal_budget", "vsd_cost_vs_latent", "vsd_steps_equal_budget"]


@pytest.fixture(scope="module")
def profile():
    return get_profile("tiny")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WADI_RESULTS_DIR", str(results))
        assert main(["worlds", "--quick", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored after timing
    tables = results / "tables"
    assert all((tables / f"benchmarks_worlds_quick.{suffix}").exists() for suffix in ("csv", "md", "tex"))
    return pd.read_csv(tables / "benchmarks_worlds_quick.csv", index_col=0)


def teacher(world: worlds.World, text_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**teacher_unet_config(world.teacher, world.size, text_dim, world.channels))


def test_one_row_per_world_with_every_column(table):
    assert table.index.name == "world" and table.index.tolist() == WORLD_NAMES
    assert table.columns.tolist() == COLUMNS
    assert (table["threads"] == 1).all()
    assert (table["teacher_batch"] == worlds.QUICK_TEACHER_BATCH).all()
    assert (table["vsd_batch"] == worlds.QUICK_VSD_BATCH).all()


def test_the_worlds_are_the_three_teachers_at_their_inputs(table):
    assert table["input"].tolist() == ["3×32×32", "3×32×32", "4×16×16"]
    assert table["cross_attention_at"].tolist() == ["8×8, mid", "32×32, 16×16, mid", "16×16, 8×8, mid"]


def test_counts_are_those_of_the_exact_configs(table, profile):
    text_dim = profile.clip.hidden_size
    for name, world in worlds.worlds(profile).items():
        unet = teacher(world, text_dim)
        row = table.loc[name]
        assert row["params"] == sum(p.numel() for p in unet.parameters())
        assert row["student_linear_share"] == pytest.approx(linear_weight_share(unet, "student"), rel=1e-12)
        assert row["block_linear_share"] == pytest.approx(linear_weight_share(unet, "fake"), rel=1e-12)
        student = copy.deepcopy(unet)
        inject(student, "lorad", profile.distill.student_rank, "student")
        assert row["student_trainable"] == count_trainable(student)


def test_the_block_linears_are_the_attention_and_feed_forward_linears_of_the_transformer_blocks(profile):
    unet = teacher(worlds.worlds(profile)["latent"], profile.clip.hidden_size)
    blocks = select_layers(unet, "fake")
    assert blocks and all(".transformer_blocks." in name and (".attn" in name or ".ff." in name) for name in blocks)
    assert set(blocks) < set(select_layers(unet, "student"))


def test_derived_columns_follow_from_the_measured_ones(table, profile):
    budgets = {"teacher": profile.latent_teacher.steps, "vsd": profile.distill.steps}
    assert budgets == {"teacher": 6_000, "vsd": 1_000}
    for kind, budget in budgets.items():
        ms = table[f"{kind}_step_ms"]
        assert (ms > 0).all()
        reference = ms["latent"]
        assert table[f"{kind}_cost_vs_latent"].tolist() == pytest.approx((ms / reference).tolist(), rel=1e-12)
        assert table[f"{kind}_steps_equal_budget"].tolist() == [round(budget * reference / value) for value in ms]
        assert table.loc["latent", f"{kind}_steps_equal_budget"] == budget


def test_the_equal_budget_needs_the_reference_row(table):
    with pytest.raises(ValueError, match="'latent' row"):
        worlds.add_equal_budget_columns(table.drop(index="latent"), 6_000, 1_000)
