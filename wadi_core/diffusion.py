"""Diffusion math shared by every backbone and the one-step students: the denoiser call and the one-step x0.

Two denoiser families, one call (:func:`predict_epsilon`):

- an SD ``UNet2DConditionModel``: ``unet(x, t, encoder_hidden_states=c).sample``;
- a PixArt ``PixArtTransformer2DModel``: T5 states with their attention mask, no micro-conditions at 256/512 px,
  and the learned-sigma half of the output dropped (the official ``train_dkd_dit.py`` keeps the first
  ``in_channels`` channels).

A conditioning tensor ``cond`` is what :meth:`wadi_core.backbones.Backbone.encode_prompts` returns: (B, L, D)
text states for CLIP; for T5 (B, L, D + 1), the states with the attention mask appended as the last feature
(:func:`pack_text_conditioning`), so that caching, indexing, CFG's null expansion and dropout treat both alike.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

# PixArt-α at 256 and 512 px takes no resolution/aspect-ratio micro-conditions (diffusers turns them on only for
# the 1024 px model, sample_size 128); the call still needs the keyword.
_NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def is_transformer_denoiser(denoiser: nn.Module) -> bool:
    """True for a PixArt-style transformer (``transformer_blocks`` + ``adaln_single``), False for a U-Net."""
    module = getattr(denoiser, "module", denoiser)  # DistributedDataParallel under ``accelerate launch``
    return hasattr(module, "transformer_blocks") and hasattr(module, "adaln_single")


def pack_text_conditioning(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states and (B, L) mask → (B, L, D + 1), the mask as the last feature (see the module doc)."""
    return torch.cat([states, attention_mask[..., None].to(states.dtype)], dim=-1)


def unpack_text_conditioning(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_text_conditioning`: (states (B, L, D), attention mask (B, L))."""
    return cond[..., :-1], cond[..., -1]


def predict_epsilon(denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
    """ε̂(x, t, c) of an SD U-Net or a PixArt transformer, (B, C, H, W) like ``x``.

    ``t`` is an int, a scalar tensor or (B,). For PixArt, ``cond`` carries the T5 mask
    (:func:`pack_text_conditioning`) and the learned-sigma channels are dropped.
    """
    if not is_transformer_denoiser(denoiser):
        return denoiser(x, t, encoder_hidden_states=cond).sample
    states, mask = unpack_text_conditioning(cond)
    timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    out = denoiser(x, encoder_hidden_states=states, timestep=timestep, encoder_attention_mask=mask,
                   added_cond_kwargs=_NO_MICRO_CONDITIONS).sample
    return out[:, : x.shape[1]]  # learned sigma: (B, 2C, H, W) → ε̂ (B, C, H, W)


def one_step_alpha_bar(scheduler: DDPMScheduler, alpha_bar: float | None = None) -> float:
    """ᾱ of the one-step formula: ``alpha_bar`` when given (the official code hard-codes 0.0047 for SD and
    PixArt alike), else the scheduler's ᾱ_{T−1} (SD1.5: 0.00466; PixArt's linear schedule: about 4e-5)."""
    if alpha_bar is not None:
        if not 0.0 < alpha_bar < 1.0:
            raise ValueError(f"one-step alpha_bar must lie in (0, 1), got {alpha_bar!r}")
        return float(alpha_bar)
    return float(scheduler.alphas_cumprod[int(scheduler.config.num_train_timesteps) - 1])


def one_step_x0(
    denoiser: nn.Module,
    z: torch.Tensor,
    cond: torch.Tensor,
    scheduler: DDPMScheduler,
    alpha_bar: float | None = None,
) -> torch.Tensor:
    """The student's one-step sample (WaDi §3.3; the training loops of ``train_dkd_sd.py`` / ``train_dkd_dit.py``).

    t = T−1, ε̂ = denoiser(z, t, c), x0 = (z − σ_T ε̂) / α_T with α_T² = :func:`one_step_alpha_bar`. In the
    denoiser's space: a latent for SD and PixArt, pixels for a pixel-space U-Net. The result is **not** clamped:
    clamping would zero the generator gradient wherever the sample leaves [−1, 1].
    """
    # 1. The last training timestep, one per sample.
    t_last = int(scheduler.config.num_train_timesteps) - 1
    t = torch.full((z.shape[0],), t_last, dtype=torch.long, device=z.device)  # (B,)
    # 2. α_T, σ_T (fp32 scheduler values, cast to z's dtype).
    if alpha_bar is None:
        alpha_bar_t = scheduler.alphas_cumprod[t_last].to(device=z.device, dtype=z.dtype)
    else:
        alpha_bar_t = torch.tensor(one_step_alpha_bar(scheduler, alpha_bar), device=z.device, dtype=z.dtype)
    alpha, sigma = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    # 3. ε-prediction at (z, T−1) and the x0 reparameterisation.
    eps = predict_epsilon(denoiser, z, t, cond)  # (B, C, H, W)
    return (z - sigma * eps) / alpha  # (B, C, H, W)
