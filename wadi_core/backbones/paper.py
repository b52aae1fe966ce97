"""The paper's backbones: SD1.5, SD2.1-base and PixArt-α 256 (``paper`` profile).

Two ways in, one config each:

- :func:`build_meta_model` instantiates the denoiser from its hub ``config.json`` (bundled verbatim in
  ``data/model_configs``) on the ``meta`` device: no weights, no memory, no network. This is what the parameter
  and layer counts of WaDi's Table 1 are computed from (:func:`count_parameters`,
  :func:`count_linear_layers`).
- :func:`load_paper_backbone` loads the real pipeline from the model hub (or its local cache) as a
  :class:`~wadi_core.backbones.Backbone`, as the official ``train_dkd_sd.py`` / ``train_dkd_dit.py`` do.

Counts on the meta device (diffusers 0.42.1), checked by ``tests/test_paper_backbones.py``:

| backbone | parameters | ``nn.Linear`` adapted by the student rule |
|---|---|---|
| ``sd15`` | 859,520,964 | 182 (under ``down_blocks`` / ``mid_block`` / ``up_blocks``) |
| ``sd21-base`` | 865,910,724 | 214 (same rule; ``proj_in`` / ``proj_out`` are Linears here) |
| ``pixart-alpha-256`` | 610,856,096 | 286 (every Linear of the transformer) |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from torch import nn

from .backbone import Backbone, PipelineLoadError, load_pipeline

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "data" / "model_configs"

# transformers 5 returns a near-empty tokenizer (a few special tokens) instead of raising when the vocabulary
# files are missing from the cache; anything this small cannot be CLIP's (49,408) or T5's (32,100) vocabulary.
_MIN_TOKENIZER_SIZE = 1_000


@dataclass(frozen=True)
class PaperBackboneSpec:
    """Where a paper backbone lives on the model hub and how WaDi adapts it (the official ``register_hooks``)."""

    hub_id: str  # repository of the denoiser weights
    subfolder: str  # the denoiser's folder in ``hub_id``
    model_class: str  # diffusers class built from the config
    config_filename: str  # bundled copy of the denoiser's config.json in data/model_configs
    components_hub_id: str  # repository of text encoder, tokenizer, scheduler and VAE
    text_encoder: str  # human-readable description of the frozen text encoder
    text_encoder_class: str  # transformers class of the text encoder
    tokenizer_class: str  # transformers class of the tokenizer
    max_length: int  # tokens per prompt (padding="max_length")
    resolution: int  # image side in pixels; the latent side is resolution // 8
    student_rank: int  # LoRaD rank of the one-step student
    fake_rank: int  # LoRaD rank of the fake score


PAPER_BACKBONES: dict[str, PaperBackboneSpec] = {
    "sd15": PaperBackboneSpec(
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        subfolder="unet",
        model_class="UNet2DConditionModel",
        config_filename="sd15_unet.json",
        components_hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        text_encoder="CLIP ViT-L/14 text tower (123M), 77 tokens",
        text_encoder_class="CLIPTextModel",
        tokenizer_class="CLIPTokenizer",
        max_length=77,
        resolution=512,
        student_rank=256,
        fake_rank=32,
    ),
    "sd21-base": PaperBackboneSpec(
        hub_id="stabilityai/stable-diffusion-2-1-base",
        subfolder="unet",
        model_class="UNet2DConditionModel",
        config_filename="sd21_base_unet.json",
        components_hub_id="stabilityai/stable-diffusion-2-1-base",
        text_encoder="OpenCLIP ViT-H/14 text tower (340M), 77 tokens",
        text_encoder_class="CLIPTextModel",
        tokenizer_class="CLIPTokenizer",
        max_length=77,
        resolution=512,
        student_rank=256,
        fake_rank=32,
    ),
    # The 256px repository ships only the transformer; its T5 encoder, tokenizer, scheduler and VAE are the
    # ones of the 512px pipeline (same T5-v1.1-XXL, same β 1e-4 → 0.02 schedule, same sd-vae-ft-ema).
    # The hub config names the legacy class Transformer2DModel, which diffusers maps to PixArtTransformer2DModel.
    "pixart-alpha-256": PaperBackboneSpec(
        hub_id="PixArt-alpha/PixArt-XL-2-256x256",
        subfolder="transformer",
        model_class="PixArtTransformer2DModel",
        config_filename="pixart_alpha_256_transformer.json",
        components_hub_id="PixArt-alpha/PixArt-XL-2-512x512",
        text_encoder="T5-v1.1-XXL encoder (4.76B), 120 tokens with attention mask",
        text_encoder_class="T5EncoderModel",
        tokenizer_class="T5Tokenizer",
        max_length=120,
        resolution=256,
        student_rank=128,
        fake_rank=32,
    ),
}


def get_spec(name: str) -> PaperBackboneSpec:
    """The :class:`PaperBackboneSpec` of ``name``; ValueError naming the allowed names otherwise."""
    if name not in PAPER_BACKBONES:
        raise ValueError(f"unknown paper backbone {name!r}; choose one of {', '.join(PAPER_BACKBONES)}")
    return PAPER_BACKBONES[name]


def load_config(name: str) -> dict:
    """The denoiser's hub ``config.json`` for ``name``, read from ``data/model_configs``."""
    return json.loads((MODEL_CONFIG_DIR / get_spec(name).config_filename).read_text())


def build_meta_model(name: str) -> nn.Module:
    """Instantiate the denoiser of ``name`` on the ``meta`` device: exact architecture, no weights, no memory.

    Parameters and buffers are all created under ``torch.device("meta")``; the model can be inspected and
    counted (WaDi Table 1) but not run.
    """
    model_class = getattr(diffusers, get_spec(name).model_class)
    config = load_config(name)
    with torch.device("meta"):
        return model_class.from_config(config)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (buffers excluded), as in the "#Params" column of WaDi's Table 1."""
    return sum(p.numel() for p in model.parameters())


def count_linear_layers(model: nn.Module, prefixes: tuple[str, ...] | None = None) -> int:
    """Number of ``nn.Linear`` modules, optionally only those under the given top-level modules.

    Args:
        model: the model to inspect.
        prefixes: qualified-name prefixes, e.g. :data:`wadi_core.adapters.inject.UNET_BLOCK_PREFIXES` for the SD
            student rule (the official ``register_hooks``); a module counts when its name equals a prefix or
            starts with ``prefix + "."``.
            ``None`` counts every Linear (the PixArt student rule).

    Returns:
        The number of matching ``nn.Linear`` modules.
    """
    return sum(
        isinstance(module, nn.Linear)
        and (prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes))
        for name, module in model.named_modules()
    )


def load_paper_backbone(name: str, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Backbone:
    """The real weights of a paper backbone from the model hub (``paper`` profile), as a :class:`Backbone`.

    Mirrors the official scripts (``train_dkd_sd.py``, ``train_dkd_dit.py``): the denoiser from ``spec.hub_id``;
    text encoder, tokenizer, VAE and the scheduler config (turned into a ``DDPMScheduler``) from
    ``spec.components_hub_id``. With ``HF_HUB_OFFLINE=1`` only the local cache is read, so the call fails fast
    instead of waiting on the network.

    Raises:
        ValueError: unknown ``name``.
        PipelineLoadError: a component is neither reachable on the hub nor in the local cache, or the tokenizer
            came without its vocabulary files.
    """
    spec = get_spec(name)
    same_repo = spec.hub_id == spec.components_hub_id and spec.subfolder in ("unet", "transformer")
    backbone = load_pipeline(spec.components_hub_id, name=name, device=device, dtype=dtype,
                             denoiser_source=None if same_repo else (spec.hub_id, spec.subfolder))
    if len(backbone.tokenizer) < _MIN_TOKENIZER_SIZE:
        raise PipelineLoadError(f"{spec.components_hub_id}: the tokenizer has only {len(backbone.tokenizer)} tokens; "
                                "its vocabulary files are missing from the cache (download the repository again)")
    return backbone
