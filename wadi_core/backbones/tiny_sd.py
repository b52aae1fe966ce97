"""The latent tiny world: a real tiny Stable Diffusion (VAE + latent U-Net in SD1.5's pattern + the tiny CLIP).

- VAE: :mod:`.tiny_vae` (4 latent channels, f = 2: 32×32 images, 4×16×16 latents).
- Teacher: a latent ``UNet2DConditionModel`` with cross-attention at every level but the lowest and in the mid
  block, as SD1.5 (:func:`wadi_core.profiles.latent_teacher_config`), trained on the scaled VAE latents of the
  training split with SD1.5's schedule (:func:`.tiny.train_denoiser`).
- :func:`save_tiny_sd_pipeline` writes the three as a stock ``StableDiffusionPipeline`` folder, which
  :func:`wadi_core.backbones.load_pipeline` reads back as a :class:`~.backbone.Backbone`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..artifacts import TrainedModel, load_or_train
from ..profiles import Profile
from ..world import make_split
from .tiny import (
    SD15_SCHEDULER_CONFIG,
    _clip_artifact_config,
    teacher_unet_config,
    text_encoder_from_clip,
    train_denoiser,
    training_text_states,
    unet_from_metadata,
)
from .tiny_vae import vae_artifact_config


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled posterior means ``scaling_factor · E(x)`` of images in [−1, 1]: the latent teacher's x0."""
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)]) * vae.config.scaling_factor


def load_or_train_latent_teacher(profile: Profile, clip: TrainedModel, vae: TrainedModel) -> TrainedModel:
    """The latent teacher of ``profile``: loaded from ``data/`` when cached, else trained on the VAE latents of the
    training split and the frozen text tower of ``clip``."""
    key = {"clip": _clip_artifact_config(profile.world, profile.clip), "vae": vae_artifact_config(profile),
           "teacher": profile.latent_teacher}

    def train() -> tuple[UNet2DConditionModel, dict, dict[str, str]]:
        split = make_split("train", profile.world)
        states, null_state = training_text_states(clip, split)
        latents = encode_latents(vae.model, split.images_float())
        unet_config = teacher_unet_config(profile.latent_teacher, latents.shape[-1], states.shape[-1],
                                          channels=latents.shape[1])
        unet, log = train_denoiser(latents, states, null_state, profile.latent_teacher, unet_config)
        return unet.requires_grad_(False), log, {"model_config": json.dumps(unet_config)}

    return load_or_train("latent_teacher", key, unet_from_metadata, train, config=profile.latent_teacher,
                         label="latent teacher")


def save_tiny_sd_pipeline(folder: str | Path, clip: TrainedModel, vae: AutoencoderKL,
                          unet: UNet2DConditionModel) -> Path:
    """The latent tiny world as a ``StableDiffusionPipeline`` folder (SD1.5's PNDM scheduler config, no safety
    checker) that stock ``StableDiffusionPipeline.from_pretrained`` loads and samples from."""
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder_from_clip(clip.model), tokenizer=clip.tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
