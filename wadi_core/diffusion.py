"""Diffusion math shared by the teacher backbone and the one-step students: the one-step x0 formula."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def one_step_x0(
    unet: torch.nn.Module, z: torch.Tensor, encoder_hidden_states: torch.Tensor, scheduler: DDPMScheduler
) -> torch.Tensor:
    """The student's one-step sample (WaDi §3.3; the official ``train_dkd_sd.py`` training loop).

    t = T−1, ε̂ = unet(z, t, c), x0 = (z − σ_T ε̂) / α_T with α_T² = ᾱ_{T−1} taken from ``scheduler`` (the
    official code hard-codes 0.0047; SD1.5's true value is 0.00466). The result is **not** clamped: clamping
    would zero the generator gradient wherever the sample leaves [−1, 1].
    """
    # 1. The last training timestep, one per sample.
    t_last = int(scheduler.config.num_train_timesteps) - 1
    t = torch.full((z.shape[0],), t_last, dtype=torch.long, device=z.device)  # (B,)
    # 2. α_T, σ_T from the scheduler's ᾱ (fp32 there; cast to z's dtype).
    alpha_bar = scheduler.alphas_cumprod[t_last].to(device=z.device, dtype=z.dtype)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    # 3. ε-prediction at (z, T−1) and the x0 reparameterisation.
    eps = unet(z, t, encoder_hidden_states=encoder_hidden_states).sample  # (B, C, H, W)
    return (z - sigma * eps) / alpha  # (B, C, H, W)
