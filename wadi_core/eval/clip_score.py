"""CLIP score: raw cosine between image and prompt embeddings (≈0.3 scale for SD, as the paper reports;
not the ×100 torchmetrics convention). The tiny world uses the tiny ShapesWorld CLIP; the paper profile uses
open_clip ViT-g-14 ``laion2b_s12b_b42k`` with the prompt prefixed by "A photo depicts " (GigaGAN → DMD2,
SwiftBrush-v2's public evaluation code; ``docs/paper_notes.md#clip-score``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from ..backbones.tiny import clip_embeddings, tokenize

PAPER_CLIP_MODEL = "ViT-g-14"
PAPER_CLIP_PRETRAINED = "laion2b_s12b_b42k"
PAPER_CLIP_PREFIX = "A photo depicts "


@torch.no_grad()
def clip_score(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, prompts: list[str],
               batch_size: int = 256) -> float:
    """Mean cosine similarity of images in [0, 1] (B, 3, H, W) with their prompts (raw cosine, not ×100).

    Each image is scored on its own (no batch statistics), so the result does not depend on ``batch_size``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    cosines = []
    for start in range(0, len(images), batch_size):
        text, image = clip_embeddings(
            clip, tokenize(tokenizer, prompts[start : start + batch_size]), images[start : start + batch_size] * 2 - 1
        )
        cosines.append((text * image).sum(-1))
    return float(torch.cat(cosines).mean())


@dataclass
class PaperClipScorer:
    """An open_clip model with its image preprocessing and tokenizer (see :func:`paper_clip_scorer`).

    ``model`` needs open_clip's ``encode_image(pixels)`` and ``encode_text(tokens)``; ``preprocess`` maps a PIL
    image to a (3, S, S) tensor; ``tokenizer`` maps a list of strings to token ids.
    """

    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    prefix: str = PAPER_CLIP_PREFIX


def paper_clip_scorer(model_name: str = PAPER_CLIP_MODEL, pretrained: str = PAPER_CLIP_PRETRAINED,
                      device: torch.device | str | None = None) -> PaperClipScorer:
    """Load the paper profile's CLIP: open_clip ViT-g-14 ``laion2b_s12b_b42k`` in float32, eval mode.

    Needs ``open_clip_torch`` (not a dependency of the tiny world) and its weights (~5 GB, downloaded by
    open_clip into the Hugging Face cache on first use); meant for a GPU machine.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the paper-profile CLIP score needs open_clip: pip install open_clip_torch "
            f"(then {model_name} / {pretrained} weights are downloaded on first use)"
        ) from error
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model = model.float().eval().requires_grad_(False)
    return PaperClipScorer(model, preprocess, open_clip.get_tokenizer(model_name), device)


def _to_pil(image) -> Image.Image:
    """PIL image from a PIL image, a (3, H, W) tensor in [0, 1] or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        image = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


@torch.no_grad()
def clip_score_paper(images: Sequence, prompts: list[str], scorer: PaperClipScorer | None = None,
                     batch_size: int = 32) -> float:
    """Mean raw cosine between images and ``scorer.prefix + prompt`` (paper protocol; ≈0.30 for SD).

    Args:
        images: PIL images, (3, H, W) tensors in [0, 1] or a (B, 3, H, W) tensor; for COCO, already
            :func:`~wadi_core.eval.center_crop_resize`-d to 256 like the FID images.
        prompts: one caption per image, without the prefix.
        scorer: from :func:`paper_clip_scorer` (loaded when None).
        batch_size: images per forward pass; the score does not depend on it.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scorer = scorer or paper_clip_scorer()
    cosines = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([scorer.preprocess(_to_pil(im)) for im in images[start : start + batch_size]])
        tokens = scorer.tokenizer([scorer.prefix + p for p in prompts[start : start + batch_size]])
        image = F.normalize(scorer.model.encode_image(pixels.to(scorer.device)).float(), dim=-1)
        text = F.normalize(scorer.model.encode_text(tokens.to(scorer.device)).float(), dim=-1)
        cosines.append((image * text).sum(-1).cpu())
    return float(torch.cat(cosines).mean())
