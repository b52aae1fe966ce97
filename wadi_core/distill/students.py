"""Trained one-step students of the tiny world, cached like the teacher (:func:`wadi_core.artifacts.load_or_train`),
and what one does with them: one-step generation and export as a vanilla diffusers U-Net (WaDi §3.3; the official
``infer_sd_model.py`` loads such a merged U-Net).

Typical use::

    backbone = load_tiny_backbone(profile)
    wadi = load_or_train_student(profile, backbone, "lorad")        # trains once, then loads from data/
    images = one_step_generate(wadi.model, backbone, prompts, seed=0)
    export_student(wadi.model, "exports/wadi-tiny")                # UNet2DConditionModel.from_pretrained(...)

A student artifact is ``data/student-<hash>.safetensors``: the trainable parameters only (adapter tensors; every
U-Net parameter for ``"full"``) plus the per-step training log as ``log.*`` tensors. The hash covers the teacher
and text-encoder artifacts, the training prompts and the :class:`~.config.VSDConfig`, so a changed teacher or
recipe never loads a stale student. Training runs in ``<cache>/vsd/<hash>/`` with checkpoints: an interrupted
run resumes there.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..adapters import inject, merged_copy
from ..artifacts import TrainedModel, artifact_path, atomic_path, cache_dir, load_or_train, module_digest
from ..diffusion import one_step_x0
from ..profiles import DistillConfig, Profile
from ..world import make_split
from .config import VSDConfig
from .vsd import train_vsd

STUDENT_KIND = "student"
STUDENT_METHODS = ("lorad", "full", "lora", "dora", "dora_frozen_norm")  # WaDi, then the baselines


def student_config(distill: DistillConfig, method: str, rank: int | None = None, **overrides) -> VSDConfig:
    """The :class:`VSDConfig` of one tiny-world student: the profile's shared recipe, the method's rank
    (LoRaD ``student_rank``, LoRA/DoRA ``baseline_rank``) and learning rate, then ``overrides``."""
    if method not in STUDENT_METHODS:
        raise ValueError(f"unknown student method {method!r}; choose one of {', '.join(STUDENT_METHODS)}")
    lrs = dict(distill.student_lrs)
    default_rank = distill.student_rank if method == "lorad" else distill.baseline_rank
    fields = dict(
        student_method=method,
        student_rank=1 if method == "full" else (rank or default_rank),
        student_lr=lrs[method],
        fake_method=distill.fake_method,
        fake_rank=distill.fake_rank,
        fake_lr=distill.fake_lr,
        guidance_scale=distill.guidance_scale,
        batch_size=distill.batch_size,
        steps=distill.steps,
        fake_warmup_steps=distill.fake_warmup_steps,
        fake_updates_per_step=distill.fake_updates_per_step,
        normalize_generator_grad=distill.normalize_generator_grad,
        ema_decay=distill.ema_decay,
        checkpoint_every=distill.checkpoint_every,
        seed=distill.seed,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(VSDConfig)}
    if unknown:
        raise ValueError(f"unknown VSDConfig field(s) {sorted(unknown)}")
    return VSDConfig(**{**fields, **overrides})


def deviation_study(distill: DistillConfig) -> dict[str, dict]:
    """WaDi-student recipe overrides that switch one deviation from the official loop at a time, all at
    ``deviation_steps`` generator steps (notebook 03): the tiny recipe itself, the official loop (no fake
    warm-up, one fake update per generator step), DMD's gradient normalisation, and a student θ-EMA."""
    steps = distill.deviation_steps
    return {
        "tiny recipe": dict(steps=steps),
        "official loop (no warm-up, 1:1)": dict(steps=steps, fake_warmup_steps=0, fake_updates_per_step=1),
        "+ DMD gradient normalisation": dict(steps=steps,
                                             normalize_generator_grad=not distill.normalize_generator_grad),
        f"+ student EMA {distill.deviation_ema_decay}": dict(steps=steps, ema_decay=distill.deviation_ema_decay),
    }


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


def _artifact_key(backbone, prompts: list[str], config: VSDConfig) -> dict:
    return {
        "teacher": module_digest(backbone.unet),
        "text_encoder": module_digest(backbone.text_encoder),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
        "vsd": dataclasses.asdict(config),
    }


def _new_student(teacher: nn.Module, config: VSDConfig) -> nn.Module:
    """Teacher copy with the config's student adapter at identity (what :func:`train_vsd` starts from)."""
    student = copy.deepcopy(teacher)
    inject(student, config.student_method, config.student_rank, "student")
    return student


def load_or_train_student(
    profile: Profile,
    backbone,
    method: str,
    rank: int | None = None,
    progress: bool = True,
    **overrides,
) -> TrainedModel:
    """The tiny-world student ``method`` of ``profile`` (optionally another ``rank`` or recipe ``overrides``),
    loaded from ``data/`` when cached, else distilled from ``backbone``'s teacher with :func:`train_vsd` on the
    unique captions of the training split. ``.config`` is its :class:`VSDConfig`, ``.log`` one row per generator
    step; the model is the teacher with the student adapter, unmerged (:func:`merged_copy` merges a copy).

    Raises:
        ArtifactError: the student is not cached and ``WADI_NO_TRAIN=1`` forbids training it, or the file is
            damaged, corrupt or from another config.
    """
    config = student_config(profile.distill, method, rank, **overrides)
    prompts = sorted(set(make_split("train", profile.world).captions))
    key = _artifact_key(backbone, prompts, config)

    def train() -> tuple[nn.Module, pd.DataFrame, dict[str, str]]:
        run_dir = cache_dir() / "vsd" / artifact_path(STUDENT_KIND, key).stem
        embeds = prompt_embeddings(backbone, prompts)
        result = train_vsd(backbone.unet, backbone.scheduler, embeds, backbone.null_embedding(), config, run_dir,
                           progress=progress)
        return result.ema_student or result.student, result.log, {"method": method}

    return load_or_train(STUDENT_KIND, key, lambda _: _new_student(backbone.unet, config), train, config=config,
                         label=f"{method} student", trainable_only=True)


@torch.no_grad()
def one_step_generate(student: nn.Module, backbone, prompts: list[str], seed: int, batch_size: int = 256,
                      progress: bool = False) -> torch.Tensor:
    """One network call per image (NFE = 1): x0 = (z − σ_T ε̂)/α_T at t = T−1
    (:func:`~wadi_core.diffusion.one_step_x0`), in [0, 1] (B, 3, H, W). All noise is drawn up front from
    ``seed``, so images do not depend on ``batch_size``."""
    channels, size = student.config.in_channels, student.config.sample_size
    noise = torch.randn(len(prompts), channels, size, size, generator=torch.Generator().manual_seed(seed))
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="one-step", disable=not progress):
        states = backbone.encode_prompts(prompts[start : start + batch_size])
        x0 = one_step_x0(student, noise[start : start + batch_size], states, backbone.scheduler)
        out.append((x0.clamp(-1, 1) + 1) / 2)
    return torch.cat(out)


def export_student(student: nn.Module, folder: str | Path) -> Path:
    """Save the merged student as a vanilla ``UNet2DConditionModel`` folder (``config.json`` +
    safetensors) that ``UNet2DConditionModel.from_pretrained(folder)`` loads with no project code: a merged
    LoRaD student costs exactly a plain U-Net call. ``student`` itself is untouched."""
    merged = merged_copy(student).requires_grad_(False)
    folder = Path(folder)
    merged.save_pretrained(folder, safe_serialization=True)
    return folder
