"""The training-step benchmark (``python -m wadi_core.benchmarks training-step``): the official-hook student is the
same function as ours at init, the step measured is the loop's own :func:`~wadi_core.distill.vsd_step`, and the
measurements report what they promise, on a toy U-Net. Timings are never asserted."""

import copy

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from test_vsd_train import BATCH, CHANNELS, DIM, PROMPTS, SIZE, TOKENS, tiny_unet

from wadi_core.adapters import count_trainable, inject
from wadi_core.adapters.official_hook import OfficialHookLoRaD
from wadi_core.backbones.tiny import make_scheduler
from wadi_core.benchmarks import training_step
from wadi_core.benchmarks.__main__ import main
from wadi_core.benchmarks.training_step import official_hook_student, training_step_costs, unet_call_seconds
from wadi_core.distill import STUDENT_METHODS, VSDConfig, one_step_x0

COST_KEYS = {"step_s", "student_fwd_bwd_s", "student_saved_MiB", "trainable"}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(PROMPTS, TOKENS, DIM, generator=g), torch.randn(1, TOKENS, DIM, generator=g)


def test_official_hook_student_matches_ours_at_init_and_has_the_same_trainable_count(prompts):
    teacher = tiny_unet()
    official = official_hook_student(teacher, rank=2)
    ours = copy.deepcopy(teacher)
    inject(ours, "lorad", 2, "student")
    assert any(isinstance(m, OfficialHookLoRaD) for m in official.modules())
    assert count_trainable(official) == count_trainable(ours) > 0
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher itself is left as it was
    z = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(one_step_x0(official, z, prompts[0][:BATCH], make_scheduler()),
                                   one_step_x0(teacher, z, prompts[0][:BATCH], make_scheduler()))


def recipe(method: str) -> VSDConfig:
    return VSDConfig(student_method=method, student_rank=2, fake_method="lora", fake_rank=2, batch_size=BATCH)


def test_training_step_costs_report_positive_times_and_saved_bytes_per_student(prompts):
    teacher = tiny_unet()
    state = torch.get_rng_state()
    students = {"ours": (recipe("lorad"), False), "official": (recipe("lorad"), True), "full": (recipe("full"), False)}
    costs = training_step_costs(teacher, make_scheduler(), prompts[0], prompts[1], students, repeats=1, warmup=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert costs.index.tolist() == ["ours", "official", "full"] and set(costs.columns) == COST_KEYS
    assert (costs[["step_s", "student_fwd_bwd_s", "student_saved_MiB"]] > 0).all().all()
    assert costs.loc["full", "trainable"] == sum(p.numel() for p in teacher.parameters())
    assert costs.loc["ours", "trainable"] == costs.loc["official", "trainable"] == count_trainable(
        official_hook_student(teacher, 2))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_the_timed_step_is_the_training_loops_interleaved(prompts, monkeypatch):
    steps = []
    real_step = training_step.vsd_step
    monkeypatch.setattr(training_step, "vsd_step",
                        lambda state: steps.append((state.config.student_method, state.step)) or real_step(state))
    students = {"lorad": (recipe("lorad"), False), "lora": (recipe("lora"), False)}
    training_step_costs(tiny_unet(), make_scheduler(), prompts[0], prompts[1], students, repeats=2, warmup=1)
    assert steps == [("lorad", 0), ("lora", 0), ("lorad", 1), ("lora", 1), ("lorad", 2), ("lora", 2)]


def test_official_hook_needs_a_lorad_student(prompts):
    with pytest.raises(ValueError, match="official_hook"):
        training_step_costs(tiny_unet(), make_scheduler(), prompts[0], prompts[1], {"x": (recipe("lora"), True)})


def test_unet_call_seconds_times_each_unet_and_checks_their_inputs(prompts):
    first, second = tiny_unet(), tiny_unet()
    seconds = unet_call_seconds({"first": first, "second": second}, prompts[0], BATCH, repeats=2)
    assert list(seconds) == ["first", "second"] and all(value > 0 for value in seconds.values())
    other = UNet2DConditionModel.from_config({**first.config, "sample_size": first.config.sample_size * 2})
    with pytest.raises(ValueError, match="different inputs"):
        unet_call_seconds({"first": first, "other": other}, prompts[0], BATCH, repeats=1)


def test_cli_quick_writes_one_row_per_student(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["training-step", "--quick"]) == 0
    table = pd.read_csv(tmp_path / "results" / "tables" / "benchmarks_training_step_quick.csv", index_col=0)
    assert table.index.tolist() == [training_step.OFFICIAL_HOOK, *STUDENT_METHODS]
    assert set(table.columns) == COST_KEYS
    assert table.loc[training_step.OFFICIAL_HOOK, "trainable"] == table.loc["lorad", "trainable"]
    assert (table["step_s"] > 0).all()
