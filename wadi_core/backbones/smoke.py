"""Tiny random-weight pipelines with the exact structure of the paper's backbones, for proving the paper code
path in CI without a download.

Each is a standard diffusers pipeline folder (``model_index.json`` + component subfolders, safetensors) that
``DiffusionPipeline.from_pretrained`` loads offline. The denoiser is built from the real hub ``config.json``
(:func:`wadi_core.backbones.paper.load_config`) with only the sizes shrunk, so block types, projections and
embeddings are those of the paper's model; 32×32 images (ShapesWorld's size), 16×16 latents (a 2-level VAE
instead of SD's 4 levels).

- ``sd15``: ``StableDiffusionPipeline``; U-Net with ``CrossAttnDownBlock2D`` ×3 + ``DownBlock2D``, a
  cross-attention mid block, 1×1-conv ``proj_in``/``proj_out``, widths 16/32/64/64 (SD: 320/640/1280/1280) and
  2 heads per level; tiny CLIP text encoder (quick-GELU as CLIP ViT-L/14) with a local BPE tokenizer; SD1.5's
  PNDM scheduler config.
- ``sd21-base``: the same with SD2.1's Linear ``proj_in``/``proj_out`` and per-level heads 1/2/4/4 (SD2.1:
  5/10/20/20, head width fixed), a GELU text encoder (as OpenCLIP ViT-H/14), the same ε-prediction schedule.
- ``pixart-alpha-256``: ``PixArtAlphaPipeline``; ``PixArtTransformer2DModel`` (adaLN-single, learned sigma:
  8 output channels for 4 latent channels, patch 2, 2 blocks) on a tiny T5 v1.1 encoder with a local Unigram
  tokenizer (120 tokens); PixArt-α's DPM-Solver++ scheduler (linear β 1e-4 → 0.02).

The weights are random: outputs are noise; only shapes, layer names and code paths mean anything. Every build
is deterministic given ``seed`` (tokenizers are estimated from ShapesWorld captions with fixed tie-breaking).
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ..artifacts import cache_dir
from ..world import sample_scene
from .paper import load_config
from .tiny import SD15_SCHEDULER_CONFIG

SMOKE_KINDS = ("sd15", "sd21-base", "pixart-alpha-256")  # the paper backbone names (PAPER_BACKBONES)
_CACHE_VERSION = "v2"  # bump when a builder below changes, so cached pipelines are rebuilt

# PixArt-α's scheduler (diffusers' PixArt conversion script: DPMSolverMultistepScheduler()), fields spelled out.
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
)

_LATENT_SIDE = 16  # sample_size of U-Net / transformer; the VAE doubles it to 32-pixel images (ShapesWorld's)
_TEXT_WIDTH = 32  # hidden size of both text encoders = cross_attention_dim / caption_channels
_UNET_SIZES = dict(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=8)
_UNET_HEADS = {"sd15": 2, "sd21-base": [1, 2, 4, 4]}  # diffusers' attention_head_dim = heads per level
_TEXT_ACT = {"sd15": "quick_gelu", "sd21-base": "gelu"}
_CAPTIONS = 2000  # ShapesWorld captions the tokenizers are estimated from


def _check_kind(kind: str) -> None:
    if kind not in SMOKE_KINDS:
        raise ValueError(f"unknown smoke pipeline kind {kind!r}; choose one of {', '.join(SMOKE_KINDS)}")


def _word_counts(backend: Tokenizer, seed: int) -> Counter[str]:
    """Words of ShapesWorld captions drawn from ``seed`` as ``backend`` pre-tokenizes them, with their counts."""
    rng = np.random.default_rng(seed)
    captions = [sample_scene(rng).caption for _ in range(_CAPTIONS)]
    if backend.normalizer is not None:
        captions = [backend.normalizer.normalize_str(caption) for caption in captions]
    return Counter(word for caption in captions for word, _ in backend.pre_tokenizer.pre_tokenize_str(caption))


def _bpe_merges(word_counts: Counter[str]) -> list[tuple[str, str]]:
    """BPE merges (CLIP style, ``</w>`` ends a word) until every word is one token, equal counts broken by the
    pair itself (the ``tokenizers`` trainers break them in hash order, so their vocabularies vary run to run)."""
    words = {tuple(word[:-1]) + (word[-1] + "</w>",): n for word, n in word_counts.items()}
    merges = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge_pair(symbols, best): n for symbols, n in words.items()}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _clip_tokenizer(seed: int) -> CLIPTokenizer:
    """CLIP's byte-level BPE layout (256 bytes, the same with ``</w>``, merges, then ``<|startoftext|>`` and
    ``<|endoftext|>``), merges learnt on ShapesWorld captions; 77 tokens."""
    merges = _bpe_merges(_word_counts(CLIPTokenizer().backend_tokenizer, seed))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer(seed: int) -> T5Tokenizer:
    """T5's Unigram layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, pieces, 100 sentinels); the pieces are the
    caption words (score log p, the maximum-likelihood unigram) and their characters as fallback; 120 tokens."""
    counts = _word_counts(T5Tokenizer().backend_tokenizer, seed)
    total = sum(counts.values())
    word_scores = {word: math.log(n / total) for word, n in counts.items()}
    chars = sorted({c for word in counts for c in word})
    pieces = sorted(word_scores.items(), key=lambda kv: (-kv[1], kv[0]))
    pieces += [(c, math.log(1 / total)) for c in chars if c not in word_scores]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=120)


def _shrunk_config(name: str, model_class: type, **sizes) -> dict:
    """The denoiser's hub ``config.json`` of paper backbone ``name`` with ``sizes`` replaced, restricted to the
    arguments of ``model_class`` (PixArt's legacy ``Transformer2DModel`` config has a few more)."""
    accepted = inspect.signature(model_class.__init__).parameters
    return {**{k: v for k, v in load_config(name).items() if k in accepted}, **sizes}


def _unet(kind: str, seed: int) -> UNet2DConditionModel:
    config = _shrunk_config(kind, UNet2DConditionModel, **_UNET_SIZES, sample_size=_LATENT_SIDE,
                            cross_attention_dim=_TEXT_WIDTH, attention_head_dim=_UNET_HEADS[kind])
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def _transformer(seed: int) -> PixArtTransformer2DModel:
    """Inner width 2 heads × 16 = 32 (PixArt-α: 16 × 72 = 1152), 2 blocks (28)."""
    heads, head_width = 2, 16
    config = _shrunk_config("pixart-alpha-256", PixArtTransformer2DModel, num_attention_heads=heads,
                            attention_head_dim=head_width, num_layers=2, sample_size=_LATENT_SIDE,
                            cross_attention_dim=heads * head_width, caption_channels=_TEXT_WIDTH)
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**config)


def _vae(seed: int) -> AutoencoderKL:
    """SD's KL autoencoder (4 latent channels, scaling 0.18215) with 2 levels: 32-pixel images, 16×16 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * _LATENT_SIDE,
        scaling_factor=0.18215,
    )


def _clip_text_encoder(kind: str, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=_TEXT_ACT[kind],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def _t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    """A T5 v1.1 encoder (gated GELU, untied embeddings) at d_model 32, 2 layers, 2 heads."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_WIDTH,
        d_kv=16,
        d_ff=2 * _TEXT_WIDTH,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _make_pipeline(kind: str, seed: int) -> StableDiffusionPipeline | PixArtAlphaPipeline:
    if kind == "pixart-alpha-256":
        tokenizer = _t5_tokenizer(seed)
        return PixArtAlphaPipeline(
            tokenizer=tokenizer,
            text_encoder=_t5_encoder(tokenizer, seed),
            vae=_vae(seed),
            transformer=_transformer(seed),
            scheduler=DPMSolverMultistepScheduler.from_config(PIXART_SCHEDULER_CONFIG),
        )
    tokenizer = _clip_tokenizer(seed)
    return StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=_clip_text_encoder(kind, tokenizer, seed),
        tokenizer=tokenizer,
        unet=_unet(kind, seed),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),  # SD1.5 and SD2.1-base both ship PNDM
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_smoke_pipeline(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight pipeline of ``kind`` (one of :data:`SMOKE_KINDS`) to ``folder``.

    ``folder`` is created; it must not exist or be empty. Returns it as a Path.

    Raises:
        ValueError: unknown ``kind``, or ``folder`` is a file or a non-empty folder (nothing is written).
    """
    _check_kind(kind)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} already exists and is not an empty folder; give a new or empty folder")
    pipeline = _make_pipeline(kind, seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def smoke_pipeline(kind: str) -> Path:
    """The folder of ``kind``'s smoke pipeline (seed 0), built on first use under
    ``cache_dir() / "smoke_pipelines"``.

    The build goes to a temporary sibling folder that is renamed into place, so an interrupted build never
    leaves half a pipeline; when another process finishes first, its pipeline is used.
    """
    _check_kind(kind)
    target = cache_dir() / "smoke_pipelines" / f"{kind}-{_CACHE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_smoke_pipeline(kind, staging)
        try:
            os.rename(staging, target)  # replaces an empty folder; fails if another build won
        except OSError as err:
            if not (target / "model_index.json").is_file():
                raise RuntimeError(f"{target} exists but holds no pipeline (no model_index.json); delete it "
                                   "and call smoke_pipeline again") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
