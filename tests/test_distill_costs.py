"""Training-step and inference cost measurements (wadi_core.distill.costs): the official-hook student is the
same function as ours at init, the measurements run on a toy U-Net and report what they promise."""

import copy

import pytest
import torch

from wadi_core.adapters import count_trainable, inject
from wadi_core.adapters.official_hook import OfficialHookLoRaD
from wadi_core.backbones.tiny import make_scheduler
from wadi_core.distill import VSDConfig, one_step_x0
from wadi_core.distill.costs import official_hook_student, unet_call_seconds, vsd_step_cost

from test_vsd_train import BATCH, CHANNELS, DIM, PROMPTS, SIZE, TOKENS, tiny_unet


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
    z = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(one_step_x0(official, z, prompts[0][:BATCH], make_scheduler()),
                                   one_step_x0(teacher, z, prompts[0][:BATCH], make_scheduler()))


@pytest.mark.parametrize("method, official_hook", [("lorad", False), ("lorad", True), ("full", False)])
def test_vsd_step_cost_reports_positive_times_and_saved_bytes(prompts, method, official_hook):
    config = VSDConfig(student_method=method, student_rank=2, fake_method="lora", fake_rank=2, batch_size=BATCH, steps=1)
    teacher = tiny_unet()
    cost = vsd_step_cost(teacher, make_scheduler(), prompts[0], prompts[1], config, official_hook, repeats=1,
                         warmup=1)
    assert set(cost) == {"step_s", "student_fwd_bwd_s", "student_saved_MiB"}
    assert cost["step_s"] > 0 and cost["student_fwd_bwd_s"] > 0 and cost["student_saved_MiB"] > 0
    assert all(not p.requires_grad for p in teacher.parameters())


def test_official_hook_needs_a_lorad_student(prompts):
    with pytest.raises(ValueError, match="official_hook"):
        vsd_step_cost(tiny_unet(), make_scheduler(), prompts[0], prompts[1], VSDConfig(student_method="lora"), True)


def test_unet_call_seconds_is_positive(prompts):
    assert unet_call_seconds(tiny_unet(), prompts[0], BATCH, repeats=2) > 0
