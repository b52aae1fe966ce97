"""CLIP score: raw cosine between image and prompt embeddings (≈0.3 scale for SD, as the paper reports;
not the ×100 torchmetrics convention). The tiny world uses the tiny ShapesWorld CLIP."""

from __future__ import annotations

import torch
from transformers import CLIPModel, CLIPTokenizer

from ..backbones.tiny import clip_embeddings, tokenize


@torch.no_grad()
def clip_score(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, prompts: list[str],
               batch_size: int = 256) -> float:
    """Mean cosine similarity of images in [0, 1] (B, 3, H, W) with their prompts (raw cosine, not ×100)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    cosines = []
    for start in range(0, len(images), batch_size):
        text, image = clip_embeddings(
            clip, tokenize(tokenizer, prompts[start : start + batch_size]), images[start : start + batch_size] * 2 - 1
        )
        cosines.append((text * image).sum(-1))
    return float(torch.cat(cosines).mean())
