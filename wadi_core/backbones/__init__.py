"""Backbones: the tiny ShapesWorld teacher (``tiny`` / ``smoke`` profiles) and the paper's SD / PixArt models.

``load_backbone("tiny")`` returns the frozen text encoder + tokenizer, the teacher ``UNet2DConditionModel``,
SD1.5's DDPM scheduler and DDIM + CFG sampling (:class:`TinyBackbone`). The paper backbones are built from
their JSON configs in ``data/model_configs`` (on the ``meta`` device for parameter counting) or loaded from
the model hub on a GPU (:mod:`wadi_core.backbones.paper`).
"""

from __future__ import annotations

from ..profiles import Profile, get_profile
from .tiny import (
    TinyBackbone,
    encode_prompts,
    load_or_train_teacher,
    load_or_train_tiny_clip,
    load_tiny_backbone,
    make_scheduler,
    sample_ddim,
    text_encoder_from_clip,
)

TINY_BACKBONES = ("tiny",)


def load_backbone(name: str = "tiny", profile: str | Profile = "tiny"):
    """Load a backbone by name: ``"tiny"`` (trained ShapesWorld teacher of ``profile``) or a paper backbone."""
    from . import paper

    if name in TINY_BACKBONES:
        return load_tiny_backbone(get_profile(profile) if isinstance(profile, str) else profile)
    if name in paper.PAPER_BACKBONES:
        return paper.load_paper_backbone(name)
    choices = ", ".join(TINY_BACKBONES + tuple(paper.PAPER_BACKBONES))
    raise ValueError(f"unknown backbone {name!r}; choose one of {choices}")
