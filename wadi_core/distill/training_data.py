"""What a one-step student trains on: the prompts' frozen text states (VSD is image-free, WaDi §3.3) and, for DMD's
regression loss and the regression warm-up (``VSDConfig.regression_weight``, ``regression_warmup_steps``; ours,
not the paper's) or the regression reference of notebook 03, the teacher's own (noise, prompt, x0) samples. Both
are regenerable and cached in the scratch folder (:func:`~wadi_core.artifacts.cache_dir`), never committed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import (
    artifact_path,
    atomic_path,
    cache_dir,
    load_checkpoint,
    module_digest,
    outdated_by_fresh,
    save_checkpoint,
)
from ..backbones.backbone import sample_ddim
from ..backbones.sample_keys import samples_key
from ..diffusion import one_step_x0

PAIRS_KIND = "regression_pairs"


def prompt_embeddings(backbone, prompts: list[str], batch_size: int = 512) -> torch.Tensor:
    """(N, L, D) frozen text states of ``prompts``: VSD is image-free and trains on these only (the official
    ``dataset.py`` feeds prompts, no images). Cached as ``<cache>/embeddings/<hash>.safetensors`` keyed by the
    prompts and the text encoder."""
    key = hashlib.sha256(json.dumps(prompts).encode() + module_digest(backbone.text_encoder).encode())
    path = cache_dir() / "embeddings" / f"{key.hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["embeddings"]
    with torch.no_grad():
        states = torch.cat([backbone.encode_prompts(prompts[i : i + batch_size])
                            for i in range(0, len(prompts), batch_size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"embeddings": states.contiguous()}, str(tmp))
    return states


def teacher_pairs(backbone, prompts: Sequence[str], pairs: int, seed: int, num_inference_steps: int,
                  guidance_scale: float, batch_size: int = 128, progress: bool = True) -> dict[str, torch.Tensor]:
    """``pairs`` (noise, caption, teacher x0) triples (the ODE pairs of DMD's regression loss): noise z drawn from
    ``seed``, the captions cycled in order, and the teacher's DDIM samples from that z (x0 in the denoiser's space,
    before any VAE decoding). Cached in the scratch folder under the key of those very samples
    (:func:`~wadi_core.backbones.sample_keys.samples_key` of the cycled captions: teacher and text-encoder weights,
    scheduler, prompts, sampler settings, seed, batch, sample shape), so that every student and regression that
    uses them shares one sampling (1,024 pairs: about 5.5 CPU-minutes on one thread in the tiny world).

    Returns ``{"z", "cond", "targets"}``; ``cond`` is not stored but re-encoded (cheap)."""
    prompts = list(prompts)[:pairs]  # the captions the pairs use: a PromptEncoder-sized list is never encoded whole
    cond = prompt_embeddings(backbone, prompts)[torch.arange(pairs) % len(prompts)]
    z = torch.randn(pairs, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))
    sampled = [prompts[i % len(prompts)] for i in range(pairs)]  # sample_ddim draws the same z from ``seed``
    key = {**samples_key(backbone, sampled, num_inference_steps, guidance_scale, seed, batch_size),
           "returns": "x0, denoiser space"}
    path = cache_dir() / PAIRS_KIND / artifact_path(PAIRS_KIND, key).name
    if path.exists() and not outdated_by_fresh(path):
        targets = load_checkpoint(path, key)[0]["targets"]
    else:
        targets = sample_ddim(backbone.denoiser, backbone.scheduler, cond, backbone.null_embedding(),
                              num_inference_steps, guidance_scale, seed, batch_size, progress, noise=z)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"targets": targets.contiguous()}, key)
    return {"z": z, "cond": cond, "targets": targets}


def pair_x0_error(student, pairs: dict[str, torch.Tensor], index: torch.Tensor, scheduler,
                  one_step_alpha_bar: float | None, device: torch.device | str = "cpu",
                  reduction: str = "mean") -> torch.Tensor:
    """DMD's regression loss on the pairs ``index`` of :func:`teacher_pairs`: the squared error between the
    student's one-step x0 from their noise and prompts and the teacher's x0 (in float32), its mean or sum."""
    x0 = one_step_x0(student, pairs["z"][index].to(device), pairs["cond"][index].to(device), scheduler,
                     one_step_alpha_bar)
    return torch.nn.functional.mse_loss(x0.float(), pairs["targets"][index].to(device).float(), reduction=reduction)
