"""The VSD objective of WaDi as pure functions (WaDi §3.3; the official ``train_dkd_sd.py`` training loop).

SwiftBrush-style, image-free variational score distillation: a one-step student maps noise to x0, a frozen
real score (the teacher) and a trainable fake score (tracking the student's distribution) are queried at a
re-noised x_t, and their difference is the gradient pushed into x0. Nothing here owns an optimizer, a model
copy or a training loop; every random draw goes through an explicit ``torch.Generator`` so that a step is a
deterministic function of (models, x0, conditions, generator state).

Order of random draws (documented so that a caller can reproduce a step):

- :func:`generator_loss`: ``t`` (B,), then ``ε`` (B, C, H, W).
- :func:`fake_score_loss`: ``t`` (B,), then ``ε`` (B, C, H, W), then the null-dropout draw.

Shapes: ``x0``/``z`` (B, C, H, W); ``cond`` (B, L, D) per-token text states; ``null`` (1, L, D) or (B, L, D),
the empty prompt's states (the unconditional branch of CFG).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..diffusion import predict_epsilon

# Reductions of the generator surrogate loss (see :func:`generator_loss`).
GENERATOR_REDUCTIONS = ("mean", "sum_pixels")
# Null-prompt dropout of the fake-score loss (see :func:`fake_score_loss`).
NULL_DROPOUT_MODES = ("batch", "sample")


def _num_timesteps(scheduler: DDPMScheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` reshaped to (B, 1, …, 1) to broadcast over ``like`` (B, C, H, W), in its dtype/device."""
    picked = values.to(device=like.device)[t.to(like.device)].to(like.dtype)  # (B,)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def _randn(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) drawn on the generator's device, then moved to ``like`` (so a CPU generator serves any device)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device=like.device, dtype=like.dtype)


def _randint(low: int, high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(device)


def _expand_null(null: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The empty prompt's states broadcast to the conditions' shape (B, L, D)."""
    return null.to(device=cond.device, dtype=cond.dtype).expand_as(cond)


def timestep_bounds(scheduler: DDPMScheduler, t_range: tuple[float, float]) -> tuple[int, int]:
    """Integer bounds [⌊t_min·T⌋, ⌊t_max·T⌋) of the generator's timestep draw; paper: [20, 981) for T = 1000."""
    T = _num_timesteps(scheduler)
    low, high = (math.floor(fraction * T + 1e-9) for fraction in t_range)
    if not 0 <= low < high <= T:
        raise ValueError(f"t_range {t_range} gives an empty timestep range [{low}, {high}) for T = {T}")
    return low, high


def cfg_epsilon(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided ε̂ = ε̂(∅) + g·(ε̂(c) − ε̂(∅)) from one batched call (WaDi §3.3).

    The unconditional input is the empty prompt "" (``null``), as in the official code. ``t`` is (B,) or a
    scalar. Gradients flow if the caller enables them; :func:`generator_loss` calls it under ``no_grad``.
    """
    batch = x_t.shape[0]
    # 1. Stack [∅; c] along the batch: (2B, C, H, W), (2B,), (2B, L, D).
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(batch)
    model_in = torch.cat([x_t, x_t])
    timesteps = torch.cat([t, t])
    states = torch.cat([_expand_null(null, cond), cond])
    # 2. One denoiser call, split back into the two branches.
    eps_null, eps_cond = predict_epsilon(unet, model_in, timesteps, states).chunk(2)  # (B, C, H, W) ×2
    # 3. Guidance.
    return eps_null + guidance_scale * (eps_cond - eps_null)


def generator_loss(
    x0: torch.Tensor,
    real_unet: torch.nn.Module,
    fake_unet: torch.nn.Module,
    cond: torch.Tensor,
    null: torch.Tensor,
    scheduler: DDPMScheduler,
    guidance_scale: float,
    generator: torch.Generator,
    t_range: tuple[float, float] = (0.02, 0.981),
    reduction: str = "mean",
    normalize: bool = False,
    fake_guidance_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VSD surrogate loss of the student (WaDi §3.3; ``train_dkd_sd.py``, the student step).

    t ~ U{⌊0.02T⌋, …, ⌊0.981T⌋−1} per sample, ε ~ N(0, I), x_t = add_noise(x0, ε, t); ε_real and ε_fake both
    with CFG at ``guidance_scale`` (paper 1.5) and without gradients; g_t = σ_t²·(ε_real − ε_fake) with
    σ_t² = 1 − ᾱ_t per sample (NaN/Inf replaced by finite values, as in the official code); the loss is
    ½‖x0 − stopgrad(x0 − g_t)‖², whose gradient with respect to x0 is ∝ g_t.

    Sign: since x0_pred = (x_t − σ_t ε̂)/α_t, −g_t = σ_t α_t·(x0_real_pred − x0_fake_pred): a descent step moves
    x0 toward the real score's prediction and away from the fake score's.

    Reduction (``reduction``):

    - ``"mean"`` (default, the official code's ``0.5 * F.mse_loss(x0, target)``): mean over every element, so
      ∂L/∂x0 = g_t / (B·C·H·W). The scale matters only through gradient clipping (norm 1.0 in the paper): with
      the mean the clip rarely fires; under Adam the scale is otherwise irrelevant.
    - ``"sum_pixels"`` (ours, not the paper's): sum over C·H·W, mean over the batch, so ∂L/∂x0 = g_t / B.

    Fake-score guidance (``fake_guidance_scale``): None guides the fake score at ``guidance_scale`` as the
    official code does; a student equal to the *unguided* teacher is then a fixed point (each score's guidance
    term, (w−1)·∇log p_t(c|x) of its own distribution, cancels the other's). 1.0 (ours, DMD's choice) leaves the
    fake score unguided, so that the fixed point is the guided teacher.

    Normalisation (``normalize=True``, ours, not the paper's): DMD's per-sample rule (Yin et al. 2024, eq. 8)
    replaces g_t by (x0_fake_pred − x0_real_pred) / mean_{C,H,W}|x0 − x0_real_pred|, which equals
    g_t / (σ_t α_t · mean|x0 − x0_real_pred|): the same direction, with a weight that does not vanish at low t
    nor explode at high t.

    Returns ``(loss, info)``; ``info`` holds detached tensors: ``g_abs_mean`` (scalar mean |g_t|), ``t`` (B,),
    and, for diagnostics and tests, ``noise``, ``x_t``, ``eps_real``, ``eps_fake``, ``g``.
    """
    if reduction not in GENERATOR_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(GENERATOR_REDUCTIONS)}")
    batch = x0.shape[0]
    # 1. Timesteps t ∈ [⌊t_min·T⌋, ⌊t_max·T⌋) and noise ε, in that order from ``generator``.
    low, high = timestep_bounds(scheduler, t_range)
    t = _randint(low, high, batch, generator, x0.device)  # (B,)
    noise = _randn(x0.shape, generator, x0)  # (B, C, H, W)
    with torch.no_grad():
        # 2. Re-noise the (detached) sample: x_t = α_t x0 + σ_t ε.
        x_t = scheduler.add_noise(x0.detach(), noise, t)  # (B, C, H, W)
        # 3. Real (teacher) and fake scores with CFG, the fake at the real's scale unless told otherwise.
        fake_scale = guidance_scale if fake_guidance_scale is None else fake_guidance_scale
        eps_real = cfg_epsilon(real_unet, x_t, t, cond, null, guidance_scale)  # (B, C, H, W)
        if fake_scale == 1.0:  # unguided: the conditional branch alone (half the fake score's forward cost)
            eps_fake = predict_epsilon(fake_unet, x_t, t, cond)  # (B, C, H, W)
        else:
            eps_fake = cfg_epsilon(fake_unet, x_t, t, cond, null, fake_scale)  # (B, C, H, W)
        # 4. g_t = σ_t² (ε_real − ε_fake), σ_t² broadcast per sample; non-finite entries made finite.
        sigma2 = 1 - _per_sample(scheduler.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        g = torch.nan_to_num(sigma2 * (eps_real.to(x0.dtype) - eps_fake.to(x0.dtype)))  # (B, C, H, W)
        if normalize:
            # 4b. DMD weight: divide by σ_t α_t · mean|x0 − x0_real_pred| per sample.
            alpha_bar = _per_sample(scheduler.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
            x0_real = (x_t - (1 - alpha_bar).sqrt() * eps_real.to(x0.dtype)) / alpha_bar.sqrt()
            scale = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
            g = torch.nan_to_num(g / ((1 - alpha_bar).sqrt() * alpha_bar.sqrt() * scale.clamp_min(1e-6)))
        target = x0.detach() - g
    # 5. Surrogate: ½‖x0 − stopgrad(x0 − g)‖², gradient ∝ g.
    if reduction == "mean":
        loss = 0.5 * F.mse_loss(x0, target, reduction="mean")
    else:
        loss = 0.5 * (x0 - target).pow(2).flatten(1).sum(dim=1).mean()
    info = {
        "g_abs_mean": g.abs().mean(),
        "t": t,
        "noise": noise,
        "x_t": x_t,
        "eps_real": eps_real,
        "eps_fake": eps_fake,
        "g": g,
    }
    return loss, info


def fake_score_loss(
    fake_unet: torch.nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    null_dropout: float = 0.1,
    null_dropout_mode: str = "batch",
) -> torch.Tensor:
    """Denoising loss of the fake score on the student's detached samples (WaDi §3.3; ``train_dkd_sd.py``).

    t ~ U{0, …, T−1} per sample, fresh ε, x_t from stopgrad(x0), null-prompt dropout with probability
    ``null_dropout``, loss = MSE(α_t ε̂_fake(x_t, t, c), α_t ε) with α_t = √ᾱ_t per sample (ε-MSE weighted by
    ᾱ_t; mean over every element, as the official ``F.mse_loss``). No CFG here: the fake score is trained
    conditionally and unconditionally so that CFG can be applied to it in :func:`generator_loss`.

    ``null_dropout_mode``: ``"batch"`` (default, the official code) replaces the whole batch's conditions by
    the empty prompt with probability ``null_dropout``; ``"sample"`` replaces each sample's independently.
    """
    if null_dropout_mode not in NULL_DROPOUT_MODES:
        raise ValueError(
            f"unknown null_dropout_mode {null_dropout_mode!r}; choose one of {', '.join(NULL_DROPOUT_MODES)}"
        )
    if not 0.0 <= null_dropout <= 1.0:
        raise ValueError(f"null_dropout must lie in [0, 1], got {null_dropout}")
    batch = x0.shape[0]
    x0 = x0.detach()
    # 1. Timesteps over the full range, noise, and the dropout draw, in that order from ``generator``.
    t = _randint(0, _num_timesteps(scheduler), batch, generator, x0.device)  # (B,)
    noise = _randn(x0.shape, generator, x0)  # (B, C, H, W)
    draws = 1 if null_dropout_mode == "batch" else batch
    drop = torch.rand(draws, generator=generator, device=generator.device).to(x0.device) < null_dropout  # (1,) | (B,)
    # 2. Conditions with null-prompt dropout: (B, L, D).
    states = torch.where(drop.reshape(-1, 1, 1), _expand_null(null, cond), cond)
    # 3. Noisy input and the fake ε-prediction.
    x_t = scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
    eps_fake = predict_epsilon(fake_unet, x_t, t, states)  # (B, C, H, W)
    # 4. ᾱ_t-weighted ε-MSE, written as MSE(α_t ε̂, α_t ε).
    alpha = _per_sample(scheduler.alphas_cumprod, t, x0).sqrt()  # (B, 1, 1, 1)
    return F.mse_loss(alpha * eps_fake.to(x0.dtype), alpha * noise)
