"""VSD objective (WaDi §3.3, ``train_dkd_sd.py``) and ``VSDConfig`` (``train_dkd_sd1.5.sh``), on a toy-size
diffusers U-Net: the generator gradient's sign and value, the fake-score loss, the one-step x0 formula, CFG."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from wadi_core.adapters import METHODS, count_trainable, inject
from wadi_core.backbones.tiny import make_scheduler
from wadi_core.diffusion import predict_epsilon
from wadi_core.distill import VSDConfig, cfg_epsilon, fake_score_loss, generator_loss, one_step_x0, timestep_bounds

BATCH, CHANNELS, SIZE, TOKENS, DIM = 2, 3, 8, 4, 8


def tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=DIM,
        attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler()


@pytest.fixture(scope="module")
def real():
    return tiny_unet(0).requires_grad_(False)


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(BATCH, TOKENS, DIM, generator=g)
    null = torch.randn(1, TOKENS, DIM, generator=g)
    return cond, null


def perturbed(unet: UNet2DConditionModel, scale: float, seed: int) -> UNet2DConditionModel:
    """A copy of ``unet`` with every weight perturbed (a fake score that disagrees with the real one)."""
    fake = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return fake


def x0_prediction(x_t, eps, t, scheduler):
    alpha_bar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


# ------------------------------------------------------------------------------------------------------------
# (a) generator loss: value of the gradient and its sign
# ------------------------------------------------------------------------------------------------------------


def test_generator_gradient_equals_g_and_points_from_fake_to_real(real, texts, scheduler):
    cond, null = texts
    fake = perturbed(real, 0.3, seed=2).requires_grad_(False)
    x0 = torch.nn.Parameter(torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    start = x0.detach().clone()
    for reduction, scale in (("mean", x0.numel()), ("sum_pixels", BATCH)):
        x0.grad = None
        loss, info = generator_loss(x0, real, fake, cond, null, scheduler, 1.5, torch.Generator().manual_seed(4),
                                    reduction=reduction)
        loss.backward()
        t, g = info["t"], info["g"]
        # t in the paper's integer range {20, …, 980}; info agrees with an independent recomputation.
        assert timestep_bounds(scheduler, (0.02, 0.981)) == (20, 981)
        assert ((t >= 20) & (t < 981)).all()
        x_t = scheduler.add_noise(start, info["noise"], t)
        eps_real = cfg_epsilon(real, x_t, t, cond, null, 1.5)
        eps_fake = cfg_epsilon(fake, x_t, t, cond, null, 1.5)
        sigma2 = (1 - scheduler.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(g, sigma2 * (eps_real - eps_fake))
        # ∂L/∂x0 = g_t, up to the documented reduction's constant (1/(B·C·H·W) for "mean", 1/B for "sum_pixels").
        torch.testing.assert_close(x0.grad * scale, g, rtol=1e-5, atol=1e-7)
        assert g.abs().max() > 1e-3  # the two scores really disagree
        torch.testing.assert_close(info["g_abs_mean"], g.abs().mean())

    # Per sample, the descent step is a positive multiple (σ_t·α_t) of (x0_real_pred − x0_fake_pred): toward the
    # real score's prediction, away from the fake's. A sign flip makes the cosine −1.
    real_pred = x0_prediction(x_t, eps_real, t, scheduler)
    fake_pred = x0_prediction(x_t, eps_fake, t, scheduler)
    step = -x0.grad
    cosine = torch.nn.functional.cosine_similarity(step.flatten(1), (real_pred - fake_pred).flatten(1), dim=1)
    assert (cosine > 0.9999).all(), cosine
    with torch.no_grad():
        x0 -= 1e-2 * x0.grad / x0.grad.norm()
    closer_to_real = (x0 - real_pred).norm() - (start - real_pred).norm()
    closer_to_fake = (x0 - fake_pred).norm() - (start - fake_pred).norm()
    assert closer_to_real < closer_to_fake


def test_fake_guidance_scale_guides_only_the_fake_score(real, texts, scheduler):
    """fake_guidance_scale=None guides both scores at guidance_scale (official); 1.0 leaves the fake unguided
    (DMD): its ε is the conditional prediction alone, while the real score keeps its guidance."""
    cond, null = texts
    fake = perturbed(real, 0.3, seed=2).requires_grad_(False)
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    _, both = generator_loss(x0, real, fake, cond, null, scheduler, 3.0, torch.Generator().manual_seed(4))
    _, same = generator_loss(x0, real, fake, cond, null, scheduler, 3.0, torch.Generator().manual_seed(4),
                             fake_guidance_scale=3.0)
    _, unguided = generator_loss(x0, real, fake, cond, null, scheduler, 3.0, torch.Generator().manual_seed(4),
                                 fake_guidance_scale=1.0)
    torch.testing.assert_close(same["g"], both["g"])
    torch.testing.assert_close(unguided["eps_real"], both["eps_real"])
    conditional = predict_epsilon(fake, unguided["x_t"], unguided["t"], cond)
    torch.testing.assert_close(unguided["eps_fake"], conditional, rtol=1e-4, atol=1e-5)
    assert (unguided["eps_fake"] - both["eps_fake"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fake_guidance_scale"):
        VSDConfig(fake_guidance_scale=0.0)
    assert "fake_guidance_scale" not in VSDConfig().key_dict()  # the bundled students' keys stay as they were
    assert VSDConfig(fake_guidance_scale=1.0).key_dict()["fake_guidance_scale"] == 1.0


def test_normalized_gradient_is_dmds_rule(real, texts, scheduler):
    """normalize=True: g = (x0_fake_pred − x0_real_pred) / mean|x0 − x0_real_pred| per sample (DMD eq. 8), a
    positive per-sample multiple of the plain g_t (same direction, same sign)."""
    cond, null = texts
    fake = perturbed(real, 0.3, seed=2).requires_grad_(False)
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    _, plain = generator_loss(x0, real, fake, cond, null, scheduler, 1.5, torch.Generator().manual_seed(4))
    _, normed = generator_loss(x0, real, fake, cond, null, scheduler, 1.5, torch.Generator().manual_seed(4),
                               normalize=True)
    t = normed["t"]
    real_pred = x0_prediction(normed["x_t"], normed["eps_real"], t, scheduler)
    fake_pred = x0_prediction(normed["x_t"], normed["eps_fake"], t, scheduler)
    expected = (fake_pred - real_pred) / (x0 - real_pred).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(normed["g"], expected, rtol=1e-4, atol=1e-6)
    ratio = (normed["g"] / plain["g"]).flatten(1)
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=0)


def test_generator_step_moves_x0_toward_real_prediction_when_fake_tracks_x0(real, texts, scheduler):
    """With a fake score that knows the sample (its ε̂ is nearer the true noise than the real score's), one SGD
    step on the generator loss decreases ‖x0 − x0_real_pred‖, x0_real_pred = (x_t − σ_t ε_real)/α_t at the
    same t and ε. The fake is the real U-Net with conv_out's bias shifted by the per-channel mean of
    (ε − ε_real), so ε_fake − ε_real is exactly that shift (also under CFG)."""
    cond, null = texts
    x0 = torch.nn.Parameter(torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5)))
    start = x0.detach().clone()
    # Draw t and ε exactly as generator_loss will (same seed, same order), to build the fake.
    gen = torch.Generator().manual_seed(6)
    t = torch.randint(20, 981, (BATCH,), generator=gen)
    noise = torch.randn(start.shape, generator=gen)
    x_t = scheduler.add_noise(start, noise, t)
    eps_real = cfg_epsilon(real, x_t, t, cond, null, 1.5)
    fake = copy.deepcopy(real)
    with torch.no_grad():
        fake.conv_out.bias += (noise - eps_real).mean(dim=(0, 2, 3))
    loss, info = generator_loss(x0, real, fake, cond, null, scheduler, 1.5, torch.Generator().manual_seed(6))
    assert torch.equal(info["t"], t) and torch.equal(info["noise"], noise)
    torch.testing.assert_close(info["eps_real"], eps_real)
    loss.backward()
    real_pred = x0_prediction(x_t, eps_real, t, scheduler)
    before = (start - real_pred).norm()
    with torch.no_grad():
        x0 -= 0.1 * x0.grad / x0.grad.norm()
    assert (x0 - real_pred).norm() < before
    # The opposite step (the classic sign bug) moves away.
    assert (start + 0.1 * x0.grad / x0.grad.norm() - real_pred).norm() > before


def test_generator_loss_needs_only_student_grad(real, texts, scheduler):
    """No gradient reaches the real or the fake score through the generator loss (both under no_grad)."""
    cond, null = texts
    fake = perturbed(real, 0.1, seed=7).requires_grad_(True)
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, requires_grad=True)
    loss, _ = generator_loss(x0, real, fake, cond, null, scheduler, 1.5, torch.Generator().manual_seed(8))
    loss.backward()
    assert x0.grad is not None and all(p.grad is None for p in fake.parameters())


# ------------------------------------------------------------------------------------------------------------
# (b) fake-score loss
# ------------------------------------------------------------------------------------------------------------


def test_fake_score_loss_decreases_on_fixed_batch(real, texts, scheduler):
    cond, null = texts
    fake = copy.deepcopy(real)
    inject(fake, "lorad", 2, rule="fake")
    assert count_trainable(fake) > 0
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(9), requires_grad=True)
    optimizer = torch.optim.Adam([p for p in fake.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = fake_score_loss(fake, x0, cond, null, scheduler, torch.Generator().manual_seed(10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert x0.grad is None  # x0 is detached inside
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # same t, ε and dropout every step
    assert losses[-1] < 0.95 * losses[0], losses


def test_fake_score_loss_formula_and_null_dropout(real, texts, scheduler):
    cond, null = texts
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    for dropout, states in ((0.0, cond), (1.0, null.expand_as(cond))):
        generator = torch.Generator().manual_seed(12)
        loss = fake_score_loss(real, x0, cond, null, scheduler, generator, null_dropout=dropout)
        gen = torch.Generator().manual_seed(12)
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        alpha = scheduler.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
        eps = real(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        torch.testing.assert_close(loss, ((alpha * eps - alpha * noise) ** 2).mean())
        # Per-sample dropout ("sample", ours) draws one flag per sample; at p ∈ {0, 1} it equals the official mode.
        per_sample = fake_score_loss(real, x0, cond, null, scheduler, torch.Generator().manual_seed(12),
                                     null_dropout=dropout, null_dropout_mode="sample")
        torch.testing.assert_close(per_sample, loss)
    with pytest.raises(ValueError, match="null_dropout_mode"):
        fake_score_loss(real, x0, cond, null, scheduler, torch.Generator(), null_dropout_mode="row")


# ------------------------------------------------------------------------------------------------------------
# (c) one-step x0, (d) CFG
# ------------------------------------------------------------------------------------------------------------


def test_one_step_x0_at_identity_is_teachers_formula_unclamped(real, texts, scheduler):
    cond, _ = texts
    z = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(13))
    # The teacher's one-step formula (TinyBackbone.one_step, before its [0, 1] display mapping).
    alpha_bar = scheduler.alphas_cumprod[999]
    assert abs(alpha_bar.item() - 0.0047) < 1e-4
    expected = (z - (1 - alpha_bar).sqrt() * real(z, 999, encoder_hidden_states=cond).sample) / alpha_bar.sqrt()
    student = copy.deepcopy(real)
    inject(student, "lorad", 4)  # identity at init
    with torch.no_grad():
        x0 = one_step_x0(student, z, cond, scheduler)
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    assert x0.abs().max() > 1.0  # 1/α_T ≈ 14.6 amplification, and no clamp


def test_cfg_epsilon(real, texts, scheduler):
    cond, null = texts
    x_t = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([100, 700])
    eps_cond = real(x_t, t, encoder_hidden_states=cond).sample
    eps_null = real(x_t, t, encoder_hidden_states=null.expand_as(cond)).sample
    torch.testing.assert_close(cfg_epsilon(real, x_t, t, cond, null, 1.0), eps_cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg_epsilon(real, x_t, t, cond, null, 0.0), eps_null, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        cfg_epsilon(real, x_t, t, cond, null, 1.5), eps_null + 1.5 * (eps_cond - eps_null), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------------------
# (e) VSDConfig
# ------------------------------------------------------------------------------------------------------------


def test_vsd_config_paper_defaults():
    config = VSDConfig()
    assert (config.student_method, config.fake_method) == ("lorad", "lorad")
    assert (config.student_rank, config.fake_rank) == (256, 32)
    assert (config.student_lr, config.fake_lr) == (1e-4, 1e-2)
    assert config.guidance_scale == 1.5 and config.grad_clip == 1.0
    assert config.t_range == (0.02, 0.981) and config.ema_decay is None
    # Deviations from the official loop are off by default.
    assert (config.fake_warmup_steps, config.fake_updates_per_step, config.normalize_generator_grad) == (0, 1, False)
    assert (config.fake_null_dropout, config.fake_null_dropout_mode, config.generator_loss_reduction) == (
        0.1, "batch", "mean")
    # DMD's regression loss and the regression warm-up: off, and out of the artifact keys while off.
    assert (config.regression_weight, config.regression_pairs, config.regression_warmup_steps) == (0.0, 0, 0)
    assert not {"regression_weight", "regression_pairs", "regression_teacher_steps",
                "regression_warmup_steps"} & set(config.key_dict())
    assert VSDConfig(regression_pairs=8, regression_warmup_steps=5).key_dict()["regression_warmup_steps"] == 5
    hash(config)  # frozen: usable as an artifact key


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(student_method="lokr"), "student_method"),
        (dict(fake_method="adalora"), "fake_method"),
        (dict(student_rank=0), "student_rank"),
        (dict(fake_rank=-1), "fake_rank"),
        (dict(t_min_fraction=0.5, t_max_fraction=0.4), "t_min_fraction"),
        (dict(t_max_fraction=1.2), "t_max_fraction"),
        (dict(student_lr=0.0), "student_lr"),
        (dict(fake_lr=-1e-2), "fake_lr"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(fake_updates_per_step=0), "fake_updates_per_step"),
        (dict(fake_warmup_steps=-1), "fake_warmup_steps"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(batch_size=0), "batch_size"),
        (dict(fake_null_dropout_mode="row"), "fake_null_dropout_mode"),
        (dict(regression_weight=-0.5, regression_pairs=8), "regression_weight"),
        (dict(regression_weight=0.5), "regression_pairs"),
        (dict(regression_pairs=8), "regression_warmup_steps"),  # pairs with neither the loss nor the warm-up
        (dict(regression_teacher_steps=0), "regression_teacher_steps"),
        (dict(regression_teacher_steps=50), "regression_teacher_steps"),  # only with the loss on
        (dict(regression_weight=float("inf"), regression_pairs=8), "regression_weight"),
        (dict(regression_weight=True, regression_pairs=8), "regression_weight"),
        (dict(regression_warmup_steps=5), "regression_pairs"),  # the warm-up fits the pairs
        (dict(regression_warmup_steps=-1, regression_pairs=8), "regression_warmup_steps"),
        (dict(steps=10, regression_warmup_steps=10, regression_pairs=8), "regression_warmup_steps"),  # no VSD step
    ],
)
def test_vsd_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        VSDConfig(**kwargs)
    if "method" in field:
        assert all(method in str(error.value) for method in METHODS)
