"""VSD training loop (WaDi §3.3): identity start, bitwise resume on CPU, NaN stop with the last checkpoint kept, the
per-step log, full fine-tuning, and the loop's pieces (build / resume / step / checkpoint) on their own, on a
toy-size diffusers U-Net."""

import copy
import json
import math

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wadi_core.adapters import count_trainable, inject
from wadi_core.backbones.tiny import make_scheduler
from wadi_core.distill import (
    VSDConfig,
    build_vsd,
    latest_checkpoint,
    one_step_x0,
    resume_vsd,
    save_vsd_checkpoint,
    train_vsd,
    vsd_step,
)
from wadi_core.distill.vsd import LOG_COLUMNS

BATCH, CHANNELS, SIZE, TOKENS, DIM, PROMPTS = 2, 3, 8, 4, 8, 16


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16),
        layers_per_block=1, cross_attention_dim=DIM, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


def config(**overrides) -> VSDConfig:
    base = dict(student_method="lorad", student_rank=2, fake_method="lora", fake_rank=2, batch_size=BATCH, steps=4,
                checkpoint_every=2, student_lr=1e-3, fake_lr=1e-3, seed=3)
    return VSDConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(PROMPTS, TOKENS, DIM, generator=gen), torch.randn(1, TOKENS, DIM, generator=gen)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, scheduler, prompts):
    embeds, null = prompts
    return train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path_factory.mktemp("A"), progress=False)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_student_starts_at_teacher_one_step_prediction(scheduler, prompts):
    embeds, _ = prompts
    teacher = tiny_unet()
    student = copy.deepcopy(teacher)
    inject(student, "lorad", 2, "student")
    z = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = one_step_x0(teacher, z, embeds[:BATCH], scheduler)
        got = one_step_x0(student, z, embeds[:BATCH], scheduler)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_training_changes_only_the_adapters_and_teacher_stays_frozen(uninterrupted):
    teacher = tiny_unet()
    assert uninterrupted.steps_done == 4 and uninterrupted.resumed_from is None
    base = dict(teacher.named_parameters())
    for name, param in uninterrupted.student.named_parameters():
        if not param.requires_grad:  # frozen base weights are the teacher's, untouched
            key = name.replace(".base_layer", "")
            assert torch.equal(param, base[key]), name
    assert any(p.abs().sum() > 0 for n, p in uninterrupted.student.named_parameters() if n.endswith("theta_a"))


def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path, scheduler, prompts, uninterrupted):
    embeds, null = prompts
    first = train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path, max_steps=2, progress=False)
    assert first.steps_done == 2
    assert latest_checkpoint(tmp_path).name == "checkpoint-2.safetensors"
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps_done == 4
    for part in ("student", "fake"):
        want, got = trainable(getattr(uninterrupted, part)), trainable(getattr(resumed, part))
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), f"{part}.{name}"
    cols = ["step", "generator_loss", "fake_loss", "student_grad_norm", "fake_grad_norm"]
    pd.testing.assert_frame_equal(resumed.log[cols], uninterrupted.log[cols], check_exact=True)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4.safetensors"]


def test_log_has_one_finite_row_per_step(uninterrupted):
    log = uninterrupted.log
    assert list(log.columns) == list(LOG_COLUMNS)
    assert log["step"].tolist() == [1, 2, 3, 4]
    assert log["regression_loss"].isna().all()  # DMD's regression loss is off by default
    assert all(math.isfinite(v) for v in log.drop(columns=["step", "regression_loss"]).to_numpy().ravel())


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, scheduler, prompts):
    embeds, null = prompts
    train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path, max_steps=2, progress=False)
    broken = tiny_unet()
    with torch.no_grad():
        broken.conv_out.weight.fill_(float("nan"))  # the student (a copy) now outputs NaN
    with pytest.raises(RuntimeError, match=r"generator step 3.*checkpoint-2\.safetensors is kept"):
        train_vsd(broken, scheduler, embeds, null, config(), tmp_path, progress=False)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "checkpoint-2.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert handle.metadata()["step"] == "2"
        assert torch.isfinite(handle.get_tensor("rng.generator").float()).all()
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["step"].tolist() == [1, 2]


def test_full_method_trains_every_student_parameter(tmp_path, scheduler, prompts):
    embeds, null = prompts
    teacher = tiny_unet()
    # Step 1 has zero generator gradient (fake score = teacher at init); step 2 sees the updated fake score.
    result = train_vsd(teacher, scheduler, embeds, null, config(student_method="full", steps=2, student_lr=1e-4),
                       tmp_path, progress=False)
    student = result.student
    assert count_trainable(student) == sum(p.numel() for p in student.parameters())
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, dict(teacher.named_parameters())[n])]
    assert len(moved) > 0.9 * len(list(student.parameters()))


def test_resume_rejects_a_different_config(tmp_path, scheduler, prompts):
    embeds, null = prompts
    train_vsd(tiny_unet(), scheduler, embeds, null, config(steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="student_lr"):
        train_vsd(tiny_unet(), scheduler, embeds, null, config(steps=2, student_lr=5e-4), tmp_path, progress=False)


def test_resume_is_bitwise_with_fake_warmup_and_two_fake_updates(tmp_path, scheduler, prompts):
    embeds, null = prompts
    cfg = config(steps=3, fake_warmup_steps=2, fake_updates_per_step=2)
    whole = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "A", progress=False)
    train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", max_steps=1, progress=False)
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", progress=False)
    assert resumed.resumed_from == 1
    for part in ("student", "fake"):
        want, got = trainable(getattr(whole, part)), trainable(getattr(resumed, part))
        assert all(torch.equal(want[n], got[n]) for n in want), part
    assert resumed.log["generator_loss"].tolist() == whole.log["generator_loss"].tolist()


def test_ema_is_the_lerp_of_the_student_and_resumes_bitwise(tmp_path, scheduler, prompts):
    embeds, null = prompts
    # After one step LoRaD's B is unchanged (A = 0 at init gives dB = 0), so EMA(d=0.5) of A is half of A.
    # (One fake warm-up step makes the fake score differ from the teacher, so step 1 moves A.)
    one = train_vsd(tiny_unet(), scheduler, embeds, null, config(steps=1, ema_decay=0.5, fake_warmup_steps=1),
                    tmp_path / "one", progress=False)
    student, ema = trainable(one.student), trainable(one.ema_student)
    for name in student:
        if name.endswith("theta_a"):
            torch.testing.assert_close(ema[name], 0.5 * student[name], rtol=0, atol=1e-7)
        else:
            assert torch.equal(ema[name], student[name]), name
    assert any(student[n].abs().sum() > 0 for n in student if n.endswith("theta_a"))
    # Interrupted and resumed, the EMA is the uninterrupted run's.
    cfg = config(steps=3, ema_decay=0.9)
    whole = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "A", progress=False)
    train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", max_steps=2, progress=False)
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", progress=False)
    want, got = trainable(whole.ema_student), trainable(resumed.ema_student)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert whole.ema_student is not whole.student and one.ema_student is not None


def test_no_ema_by_default(uninterrupted):
    assert uninterrupted.ema_student is None


def test_normalized_generator_gradient_trains_and_differs(tmp_path, scheduler, prompts):
    embeds, null = prompts
    plain = train_vsd(tiny_unet(), scheduler, embeds, null, config(steps=3), tmp_path / "plain", progress=False)
    normed = train_vsd(tiny_unet(), scheduler, embeds, null, config(steps=3, normalize_generator_grad=True),
                       tmp_path / "normed", progress=False)
    assert all(math.isfinite(v) for v in normed.log["generator_loss"])
    assert normed.log["generator_loss"].tolist() != plain.log["generator_loss"].tolist()


def test_the_pieces_step_by_step_equal_train_vsd(tmp_path, scheduler, prompts, uninterrupted):
    """build_vsd, vsd_step, save_vsd_checkpoint and resume_vsd called by hand give train_vsd's run bitwise."""
    embeds, null = prompts
    cfg = config()
    with torch.random.fork_rng(devices=[]):
        state = build_vsd(tiny_unet(), scheduler, embeds, null, cfg)
        assert resume_vsd(state, tmp_path) is None and state.step == 0
        first = [vsd_step(state) for _ in range(2)]
        assert state.step == 2 and set(first[0]) == set(LOG_COLUMNS) - {"step", "seconds"}
        path = save_vsd_checkpoint(state, tmp_path)
    assert path == latest_checkpoint(tmp_path) and state.last_checkpoint == path
    with torch.random.fork_rng(devices=[]):
        resumed = build_vsd(tiny_unet(), scheduler, embeds, null, cfg)
        assert resume_vsd(resumed, tmp_path) == 2
        rest = [vsd_step(resumed) for _ in range(2)]
    log = uninterrupted.log
    assert [row["generator_loss"] for row in first + rest] == log["generator_loss"].tolist()
    assert [row["fake_grad_norm"] for row in first + rest] == log["fake_grad_norm"].tolist()
    want, got = trainable(uninterrupted.student), trainable(resumed.raw_student)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_build_vsd_trains_a_given_student(scheduler, prompts):
    embeds, null = prompts
    teacher = tiny_unet()
    student = copy.deepcopy(teacher)
    inject(student, "lora", 2, "student")
    with torch.random.fork_rng(devices=[]):
        state = build_vsd(teacher, scheduler, embeds, null, config(), student=student)
        before = trainable(student)
        vsd_step(state)
        vsd_step(state)
    assert state.raw_student is student
    assert any(not torch.equal(before[n], p) for n, p in trainable(student).items())


def teacher_pairs_of(embeds, count: int = 6) -> dict[str, torch.Tensor]:
    """Stand-in teacher pairs: noise, prompt states and a target x0 (any fixed tensor serves the loop's tests)."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(count, CHANNELS, SIZE, SIZE, generator=gen)
    return {"z": z, "cond": embeds[:count], "targets": 0.5 * torch.randn(count, CHANNELS, SIZE, SIZE, generator=gen)}


def test_regression_loss_is_the_x0_error_on_pairs_drawn_after_the_generator_loss(scheduler, prompts):
    """DMD's regression term: MSE(x0_student(z, c), x0_teacher) on B pair indices drawn from the loop generator
    after the generator loss's (t, ε); it is added to the generator loss at ``regression_weight``."""
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)
    cfg = config(regression_weight=0.5, regression_pairs=6)
    with torch.random.fork_rng(devices=[]):
        state = build_vsd(tiny_unet(), scheduler, embeds, null, cfg, regression_pairs=pairs)
        before = copy.deepcopy(state.raw_student)
        replay = torch.Generator().set_state(state.generator.get_state())
        row = vsd_step(state)
    torch.randint(0, PROMPTS, (BATCH,), generator=replay)  # prompt indices
    torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=replay)  # z
    torch.randint(20, 981, (BATCH,), generator=replay)  # the generator loss's t ...
    torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=replay)  # ... and ε
    index = torch.randint(0, 6, (BATCH,), generator=replay)
    with torch.no_grad():
        x0 = one_step_x0(before, pairs["z"][index], pairs["cond"][index], scheduler)
    assert row["regression_loss"] == pytest.approx(float((x0 - pairs["targets"][index]).square().mean()), rel=1e-5)
    assert math.isfinite(row["generator_loss"])


def test_regression_loss_pulls_the_student_to_the_pairs_and_resumes_bitwise(tmp_path, scheduler, prompts):
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)
    plain = config(steps=6, student_lr=1e-2)
    regressed = config(steps=6, student_lr=1e-2, regression_weight=100.0, regression_pairs=6)

    def pair_error(student) -> float:
        with torch.no_grad():
            x0 = one_step_x0(student, pairs["z"], pairs["cond"], scheduler)
        return float((x0 - pairs["targets"]).square().mean())

    vsd = train_vsd(tiny_unet(), scheduler, embeds, null, plain, tmp_path / "vsd", progress=False)
    whole = train_vsd(tiny_unet(), scheduler, embeds, null, regressed, tmp_path / "A", progress=False,
                      regression_pairs=pairs)
    assert pair_error(whole.student) < pair_error(vsd.student)
    assert whole.log["regression_loss"].notna().all()
    train_vsd(tiny_unet(), scheduler, embeds, null, regressed, tmp_path / "B", max_steps=3, progress=False,
              regression_pairs=pairs)
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, regressed, tmp_path / "B", progress=False,
                        regression_pairs=pairs)
    want, got = trainable(whole.student), trainable(resumed.student)
    assert resumed.resumed_from == 3 and all(torch.equal(want[n], got[n]) for n in want)
    assert resumed.log["regression_loss"].tolist() == whole.log["regression_loss"].tolist()


def test_the_student_gradient_is_the_vsd_gradient_plus_weight_times_the_regression_gradient(scheduler, prompts):
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)

    def first_gradient(weight: float) -> torch.Tensor:
        cfg = config(grad_clip=1e9, **(dict(regression_weight=weight, regression_pairs=6) if weight else {}))
        with torch.random.fork_rng(devices=[]):
            state = build_vsd(tiny_unet(), scheduler, embeds, null, cfg, regression_pairs=pairs if weight else None)
            grads = []
            state.opt_student.step = lambda: grads.append(torch.cat(
                [p.grad.flatten() for p in state.raw_student.parameters() if p.requires_grad]))
            vsd_step(state)
        return grads[0]

    vsd, once, thrice = first_gradient(0.0), first_gradient(1.0), first_gradient(3.0)
    assert (once - vsd).abs().max() > 0
    scale = float((once - vsd).abs().max())  # float32 sums: compare at 1e-5 of the largest entry
    torch.testing.assert_close(thrice - vsd, 3 * (once - vsd), rtol=1e-2, atol=1e-5 * scale)


def test_a_checkpoint_from_before_the_regression_fields_resumes(tmp_path, scheduler, prompts, uninterrupted):
    """A checkpoint whose config lacks fields added to VSDConfig later resumes: they count as their defaults."""
    embeds, null = prompts
    train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path, max_steps=2, progress=False)
    path = latest_checkpoint(tmp_path)
    tensors, metadata = load_file(str(path)), safe_open(str(path), framework="pt").metadata()
    saved = json.loads(metadata["config"])
    for name in ("regression_weight", "regression_pairs", "regression_teacher_steps", "regression_warmup_steps"):
        del saved[name]
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(saved)})
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, config(), tmp_path, progress=False)
    assert resumed.resumed_from == 2
    want, got = trainable(uninterrupted.student), trainable(resumed.student)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_regression_warmup_fits_the_student_alone_then_vsd_starts_after_the_fake_warmup(scheduler, prompts):
    """The first ``regression_warmup_steps`` steps draw only the pairs' indices and move only the student (the
    regression loss alone, no generator or fake-score value); the fake-score warm-up then runs before the first VSD
    step, which is an ordinary one."""
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)
    cfg = config(regression_pairs=6, regression_warmup_steps=2, fake_warmup_steps=1)
    with torch.random.fork_rng(devices=[]):
        state = build_vsd(tiny_unet(), scheduler, embeds, null, cfg, regression_pairs=pairs)
        fake_before, student_before = trainable(state.raw_fake), copy.deepcopy(state.raw_student)
        replay = torch.Generator().set_state(state.generator.get_state())
        first = vsd_step(state)
        index = torch.randint(0, 6, (BATCH,), generator=replay)
        assert torch.equal(replay.get_state(), state.generator.get_state())  # the pairs' indices and nothing else
        vsd_step(state)
        assert all(torch.equal(fake_before[n], p) for n, p in trainable(state.raw_fake).items())
        assert any(not torch.equal(p, q) for p, q in zip(trainable(student_before).values(),
                                                         trainable(state.raw_student).values()))
    with torch.no_grad():
        x0 = one_step_x0(student_before, pairs["z"][index], pairs["cond"][index], scheduler)
    assert first["regression_loss"] == pytest.approx(float((x0 - pairs["targets"][index]).square().mean()), rel=1e-5)
    assert math.isnan(first["generator_loss"]) and math.isnan(first["fake_loss"])
    assert math.isnan(first["fake_grad_norm"]) and math.isfinite(first["student_grad_norm"])


def test_regression_warmup_resumes_bitwise_across_its_end(tmp_path, scheduler, prompts):
    """A run stopped at the last warm-up step (its checkpoint precedes the fake-score warm-up) and resumed equals
    the uninterrupted run; the log has the warm-up's rows with the regression loss alone, the VSD rows after them
    without it (weight 0)."""
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)
    cfg = config(steps=4, regression_pairs=6, regression_warmup_steps=2, fake_warmup_steps=1)
    whole = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "A", progress=False,
                      regression_pairs=pairs)
    train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", max_steps=2, progress=False,
              regression_pairs=pairs)
    resumed = train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path / "B", progress=False,
                        regression_pairs=pairs)
    assert resumed.resumed_from == 2
    for model in ("student", "fake"):
        want, got = trainable(getattr(whole, model)), trainable(getattr(resumed, model))
        assert all(torch.equal(want[n], got[n]) for n in want)
    log = whole.log.set_index("step")
    assert log.loc[[1, 2], "regression_loss"].notna().all() and log.loc[[1, 2], "generator_loss"].isna().all()
    assert log.loc[[3, 4], "regression_loss"].isna().all() and log.loc[[3, 4], "generator_loss"].notna().all()
    pd.testing.assert_frame_equal(resumed.log.drop(columns="seconds"), whole.log.drop(columns="seconds"),
                                  check_exact=True)


def test_a_resume_on_other_regression_pairs_is_refused(tmp_path, scheduler, prompts):
    embeds, null = prompts
    pairs = teacher_pairs_of(embeds)
    cfg = config(regression_weight=1.0, regression_pairs=6)
    train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path, max_steps=2, progress=False, regression_pairs=pairs)
    resampled = {**pairs, "targets": pairs["targets"] + 1e-3}
    with pytest.raises(ValueError, match="other regression pairs"):
        train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path, progress=False, regression_pairs=resampled)
    assert train_vsd(tiny_unet(), scheduler, embeds, null, cfg, tmp_path, progress=False,
                     regression_pairs=pairs).resumed_from == 2


@pytest.mark.parametrize("weight, count, given, match", [
    (0.5, 6, None, "needs regression pairs"),
    (0.0, 0, 6, "regression_pairs is 0"),
    (0.5, 5, 6, "regression_pairs=5"),
    (0.5, 6, "wrong shape", "sample shape"),
])
def test_regression_pairs_must_match_the_config(scheduler, prompts, weight, count, given, match):
    embeds, null = prompts
    pairs = None if given is None else teacher_pairs_of(embeds, 6 if given == "wrong shape" else given)
    if given == "wrong shape":
        pairs = {**pairs, "z": pairs["z"][:, :, :4], "targets": pairs["targets"][:, :, :4]}
    with pytest.raises(ValueError, match=match):
        build_vsd(tiny_unet(), scheduler, embeds, null, config(regression_weight=weight, regression_pairs=count),
                  regression_pairs=pairs)
