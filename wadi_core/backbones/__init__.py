"""Backbones: one :class:`Backbone` for the tiny ShapesWorld teacher and the paper's SD / PixArt pipelines.

``load_backbone(name_or_path)`` is the one entry point:

- ``"tiny"`` / ``"tiny-smoke"``: the latent tiny Stable Diffusion of the ``tiny`` / ``smoke`` profile, a stock
  ``StableDiffusionPipeline`` folder (``data/tiny_sd/``, bundled; built from its artifacts when missing or stale;
  :mod:`.tiny_sd`);
- ``"tiny-pixel"`` / ``"tiny-pixel-smoke"``: the pixel-space tiny world of the same profiles (trained on first use;
  :mod:`.tiny`), the world the latent one replaced, kept for :func:`wadi_core.distill.world_study`;
- ``"sd15"``, ``"sd21-base"``, ``"pixart-alpha-256"``: the paper's backbones from the model hub or its local cache
  (:mod:`.paper`; their configs are bundled in ``data/model_configs`` for meta-device counting);
- ``"smoke-sd15"``, ``"smoke-sd21-base"``, ``"smoke-pixart-alpha-256"``: tiny random-weight pipelines with the
  paper backbones' exact structure, built offline (:mod:`.smoke`), which prove the paper code path on a CPU;
- a local diffusers pipeline folder (``StableDiffusionPipeline`` or ``PixArtAlphaPipeline`` layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..profiles import get_profile
from .backbone import (
    OFFICIAL_ONE_STEP_ALPHA_BAR,
    PIPELINE_LAYOUTS,
    Backbone,
    PipelineLoadError,
    load_pipeline,
    sample_ddim,
)
from .tiny import (
    encode_prompts,
    load_or_train_teacher,
    load_or_train_tiny_clip,
    load_tiny_backbone,
    make_scheduler,
    text_encoder_from_clip,
)
from .tiny_sd import load_or_train_latent_teacher, load_tiny_sd_backbone
from .tiny_vae import load_or_train_tiny_vae, reconstruct

# backbone name → the profile whose tiny world it is: the latent tiny SD, and the pixel-space tiny world
TINY_BACKBONES = {"tiny": "tiny", "tiny-smoke": "smoke"}
TINY_PIXEL_BACKBONES = {"tiny-pixel": "tiny", "tiny-pixel-smoke": "smoke"}
SMOKE_PREFIX = "smoke-"


def backbone_names() -> tuple[str, ...]:
    """Every name :func:`load_backbone` knows (a local pipeline folder is accepted besides)."""
    from .paper import PAPER_BACKBONES
    from .smoke import SMOKE_KINDS

    return (*TINY_BACKBONES, *TINY_PIXEL_BACKBONES, *PAPER_BACKBONES, *(SMOKE_PREFIX + kind for kind in SMOKE_KINDS))


def load_backbone(name_or_path: str | Path = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> Backbone:
    """The :class:`Backbone` named ``name_or_path`` (see the module doc), frozen, on ``device``.

    Args:
        name_or_path: a name of :func:`backbone_names` or a local diffusers pipeline folder.
        device: default CUDA when available, else CPU (the tiny world always loads on the CPU first).
        dtype: weight dtype of the loaded models (default: as saved; the official scripts use fp16).

    Raises:
        ValueError: an unknown name that is not a folder either (the message lists the names).
        PipelineLoadError: a folder or hub repository that cannot be loaded (missing or mismatched component,
            not cached while offline); the message names the component and what to do.
    """
    from . import paper, smoke

    name = str(name_or_path)
    if name in TINY_BACKBONES or name in TINY_PIXEL_BACKBONES:
        if name in TINY_BACKBONES:
            backbone = load_tiny_sd_backbone(get_profile(TINY_BACKBONES[name]), name=name)
        else:
            backbone = load_tiny_backbone(get_profile(TINY_PIXEL_BACKBONES[name]), name=name)
        if device is not None or dtype is not None:
            for model in (backbone.text_encoder, backbone.denoiser, backbone.vae, backbone.clip):
                if model is not None:
                    model.to(device=device, dtype=dtype)
        return backbone
    if name in paper.PAPER_BACKBONES:
        return paper.load_paper_backbone(name, device=device, dtype=dtype)
    if name.startswith(SMOKE_PREFIX) and name[len(SMOKE_PREFIX):] in smoke.SMOKE_KINDS:
        return load_pipeline(smoke.smoke_pipeline(name[len(SMOKE_PREFIX):]), name=name, device=device, dtype=dtype)
    if Path(name).is_dir():
        return load_pipeline(Path(name), device=device, dtype=dtype)
    raise ValueError(f"unknown backbone {name!r}: not a pipeline folder and not one of "
                     f"{', '.join(backbone_names())}")


__all__ = [
    "OFFICIAL_ONE_STEP_ALPHA_BAR",
    "PIPELINE_LAYOUTS",
    "TINY_BACKBONES",
    "TINY_PIXEL_BACKBONES",
    "Backbone",
    "PipelineLoadError",
    "backbone_names",
    "encode_prompts",
    "load_backbone",
    "load_or_train_latent_teacher",
    "load_or_train_teacher",
    "load_or_train_tiny_clip",
    "load_or_train_tiny_vae",
    "load_pipeline",
    "load_tiny_backbone",
    "load_tiny_sd_backbone",
    "make_scheduler",
    "reconstruct",
    "sample_ddim",
    "text_encoder_from_clip",
]
