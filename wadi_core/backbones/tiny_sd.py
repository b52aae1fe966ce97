"""The latent tiny world: a real tiny Stable Diffusion (VAE + latent U-Net in SD1.5's pattern + the tiny CLIP).

- VAE: :mod:`.tiny_vae` (4 latent channels, f = 2: 32×32 images, 4×16×16 latents).
- Teacher: a latent ``UNet2DConditionModel`` with cross-attention at every level but the lowest and in the mid
  block, as SD1.5 (:func:`wadi_core.profiles.latent_teacher_config`), trained on the scaled VAE latents of the
  training split with SD1.5's schedule (:func:`.tiny.train_denoiser`).
- :func:`save_tiny_sd_pipeline` writes the three as a stock ``StableDiffusionPipeline`` folder, which
  :func:`wadi_core.backbones.load_pipeline` reads back as a :class:`~.backbone.Backbone`.
- :func:`load_tiny_sd_backbone` is ``load_backbone("tiny")`` / ``load_backbone("tiny-smoke")``: the folder of the
  profile (``data/tiny_sd/`` for ``tiny``, bundled; ``tiny_sd-<profile>/`` otherwise), rebuilt from the three
  artifacts when it is missing or stale (:func:`load_or_build_tiny_sd_folder`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..artifacts import (
    TrainedModel,
    atomic_folder,
    data_dir,
    file_sha256,
    folder_matches_checksums,
    load_or_train,
    outdated_by_fresh,
    read_checksums,
    record_folder_checksums,
)
from ..profiles import Profile
from ..world import make_split
from .backbone import Backbone, load_pipeline
from .tiny import (
    SD15_SCHEDULER_CONFIG,
    _clip_artifact_config,
    load_or_train_tiny_clip,
    teacher_unet_config,
    text_encoder_from_clip,
    train_denoiser,
    training_text_states,
    unet_from_metadata,
)
from .tiny_vae import load_or_train_tiny_vae, vae_artifact_config

SOURCES_FILE = "wadi_sources.json"  # in the folder: {kind: {file, sha256}} of the artifacts it was built from


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


def tiny_sd_folder(profile: Profile) -> Path:
    """Where the latent tiny SD of ``profile`` lives: ``<data dir>/tiny_sd`` for ``tiny`` (the bundled one), else
    ``<data dir>/tiny_sd-<profile name>``."""
    return data_dir() / ("tiny_sd" if profile.name == "tiny" else f"tiny_sd-{profile.name}")


def _sources(models: dict[str, TrainedModel]) -> dict[str, dict[str, str]]:
    """``{kind: {"file", "sha256"}}`` of the artifacts a folder is built from (SHA-256 from SHA256SUMS if listed)."""
    return {kind: {"file": model.path.name,
                   "sha256": read_checksums(model.path.parent).get(model.path.name) or file_sha256(model.path)}
            for kind, model in models.items()}


def _is_current(folder: Path, sources: dict[str, dict[str, str]]) -> bool:
    """The folder was built from ``sources`` and its files are those its build listed in SHA256SUMS."""
    try:
        built_from = json.loads((folder / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return False
    return built_from == sources and folder_matches_checksums(folder)


def load_or_build_tiny_sd_folder(profile: Profile, clip: TrainedModel) -> Path:
    """The latent tiny SD of ``profile`` as a ``StableDiffusionPipeline`` folder (:func:`tiny_sd_folder`).

    Its tiny VAE and latent teacher are loaded from the data directory when cached, else trained (as ``clip``,
    from :func:`~.tiny.load_or_train_tiny_clip`). The folder is (re)built with :func:`save_tiny_sd_pipeline` when it
    is missing or stale: its ``wadi_sources.json`` names other files or SHA-256s than those of the three, or its
    files are not those its build listed in the data directory's SHA256SUMS; under ``WADI_FRESH=1`` it is rebuilt
    once per run, as the artifacts are retrained. The build goes to a temporary folder renamed into place
    (:func:`~wadi_core.artifacts.atomic_folder`) and then lists every file in SHA256SUMS.
    """
    vae = load_or_train_tiny_vae(profile)
    teacher = load_or_train_latent_teacher(profile, clip, vae)
    folder = tiny_sd_folder(profile)
    sources = _sources({"tiny_clip": clip, "tiny_vae": vae, "latent_teacher": teacher})
    if outdated_by_fresh(folder) or not _is_current(folder, sources):
        with atomic_folder(folder) as staging:
            save_tiny_sd_pipeline(staging, clip, vae.model, teacher.model)
            (staging / SOURCES_FILE).write_text(json.dumps(sources, indent=2, sort_keys=True) + "\n")
        record_folder_checksums(folder)
    return folder


def load_tiny_sd_backbone(profile: Profile, name: str = "tiny") -> Backbone:
    """The latent tiny SD of ``profile`` as a :class:`~.backbone.Backbone` named ``name``, on the CPU: its folder
    read by :func:`~.backbone.load_pipeline`, with the profile's student and fake-score ranks and the tiny CLIP
    (``clip``) for the CLIP score, as the pixel tiny backbone has them."""
    clip = load_or_train_tiny_clip(profile)
    backbone = load_pipeline(load_or_build_tiny_sd_folder(profile, clip), name=name, device="cpu")
    return dataclasses.replace(backbone, student_rank=profile.distill.student_rank,
                               fake_rank=profile.distill.fake_rank, clip=clip.model.requires_grad_(False))
