"""One-step students of any :class:`~wadi_core.backbones.Backbone`: distilled (:func:`distill`), generated from
(:func:`one_step_generate`) and exported as a stock diffusers pipeline (:func:`export_student`); the tiny world's
students are cached like its teacher (:func:`load_or_train_student`, WaDi §3.3).

Typical use (the same calls for ``"tiny"``, ``"sd15"``, ``"pixart-alpha-256"`` or a pipeline folder)::

    backbone = load_backbone("sd15")
    result = distill(backbone, prompts, VSDConfig(mixed_precision="fp16"), "runs/wadi-sd15")
    images = one_step_generate(result.student, backbone, prompts, seed=0)   # (B, 3, H, W) in [0, 1]
    export_student(result.student, backbone, "exports/wadi-sd15")           # DiffusionPipeline.from_pretrained(...)

A student artifact is ``data/student-<hash>.safetensors``: the trainable parameters only (adapter tensors; every
U-Net parameter for ``"full"``) plus the per-step training log as ``log.*`` tensors. The hash covers the teacher
and text-encoder artifacts, the training prompts and the :class:`~.config.VSDConfig`, so a changed teacher or
recipe never loads a stale student. Training runs in ``<cache>/vsd/<hash>/`` with checkpoints: an interrupted
run resumes there.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..adapters import inject, merged_copy
from ..artifacts import (
    TrainedModel,
    artifact_path,
    cache_dir,
    load_or_train,
    module_digest,
    prompts_digest,
)
from ..backbones.denoisers import check_denoiser_matches
from ..diffusion import one_step_x0
from ..profiles import DistillConfig, Profile
from ..world import make_split
from .config import VSDConfig
from .training_data import prompt_embeddings, teacher_pairs
from .vsd import PromptEncoder, VSDResult, train_vsd

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
        fake_guidance_scale=distill.fake_guidance_scale,
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


# recipe_search's stages
FIRST_RECIPE, COMBINATIONS, RECIPE, DMD_REGRESSION = "first recipe", "combinations", "recipe", "DMD regression loss"
REGRESSION_WARMUP = "regression warm-up"


def _recipe_search_by_stage(distill: DistillConfig) -> dict[str, dict[str, dict]]:
    """:func:`recipe_search`'s variants by stage (:data:`FIRST_RECIPE`, :data:`COMBINATIONS`, :data:`RECIPE`,
    :data:`DMD_REGRESSION`, :data:`REGRESSION_WARMUP`), in the order they ran."""
    half, longer = distill.steps // 2, distill.steps * 7 // 5
    first = dict(steps=half, student_rank=19, student_lr=1e-3, fake_method="lorad", fake_lr=1e-2,
                 guidance_scale=1.5, fake_guidance_scale=None)
    full_fake = dict(fake_method="full", fake_lr=1e-4)
    unguided = dict(guidance_scale=3.0, fake_guidance_scale=1.0)
    combined = dict(student_rank=19, student_lr=3e-3, **full_fake, **unguided)
    stronger = dict(guidance_scale=4.5, fake_updates_per_step=4)
    first_recipe = {
        "the first tiny recipe": first,
        "first + full FT student (1e-4) and full fake score": {**first, **full_fake, "student_method": "full",
                                                               "student_rank": 1, "student_lr": 1e-4},
        "first + DMD gradient normalisation": {**first, "normalize_generator_grad": True},
        "first + guidance 4.5, unguided fake score": {**first, "guidance_scale": 4.5, "fake_guidance_scale": 1.0},
        "first + student lr 3e-3": {**first, "student_lr": 3e-3},
        "first + full fake score": {**first, **full_fake},
        "first + guidance 3": {**first, "guidance_scale": 3.0},
        "first + student lr 3e-3, full fake score": {**first, "student_lr": 3e-3, **full_fake},
        "first + guidance 3, unguided fake score": {**first, **unguided},
        "first + student lr 3e-3, guidance 3, unguided fake score": {**first, "student_lr": 3e-3, **unguided},
    }
    combinations = {
        "lr 3e-3, full fake score, guidance 3": {**combined, "fake_guidance_scale": None},
        "lr 3e-3, full fake score, guidance 3, unguided fake score": combined,
        **{f"the same, training seed {seed}": {**combined, "seed": seed} for seed in distill.seeds[1:2]},
        "the same, 1.4x the steps": {**combined, "steps": longer},
        "the same, student EMA 0.99": {**combined, "ema_decay": 0.99},
        "the same, 4 fake updates per step": {**combined, "fake_updates_per_step": 4},
    }
    recipe = {
        f"the recipe (the same at LoRaD r = {distill.student_rank})": {},
        "recipe + fake score lr 3e-4": {"fake_lr": 3e-4},
        f"recipe at batch {2 * distill.batch_size} for half the steps": {"batch_size": 2 * distill.batch_size,
                                                                          "steps": half},
        "recipe + generator t from 0.2 T": {"t_min_fraction": 0.2},
        "recipe + student lr 1e-3": {"student_lr": 1e-3},
        "recipe + guidance 4.5": {"guidance_scale": 4.5},
        "recipe + DMD gradient normalisation": {"normalize_generator_grad": True},
        "recipe + guidance 4.5, 4 fake updates per step": stronger,
        **{f"recipe + guidance 4.5, 4 fake updates, training seed {seed}": {**stronger, "seed": seed}
           for seed in distill.seeds[1:]},
    }
    pairs = dict(regression_pairs=512)  # 2.75 CPU-minutes of teacher sampling: the run stays near the budget
    full_student = dict(student_method="full", student_rank=1, student_lr=dict(distill.student_lrs)["full"])
    dmd = {
        "recipe + DMD regression loss 0.25 (512 teacher pairs)": {**pairs, "regression_weight": 0.25},
        "recipe + DMD regression loss 1 (512 teacher pairs)": {**pairs, "regression_weight": 1.0},
        "recipe + DMD regression loss 0.05 (512 teacher pairs)": {**pairs, "regression_weight": 0.05},
        "recipe, full FT student (1e-4) + DMD regression loss 1 (512 teacher pairs)": {
            **full_student, **pairs, "regression_weight": 1.0},
    }
    # The student first fitted to the same pairs for as many steps as VSD then runs (a warm-up step costs about a
    # third of a VSD step): VSD starts from a regression fit instead of from the teacher, as SwiftBrush v2 starts from
    # SD-Turbo.
    def warmup_of(fit_steps: int) -> dict:  # fit_steps of regression, then the recipe's VSD steps
        return dict(**pairs, regression_warmup_steps=fit_steps, steps=fit_steps + distill.steps)

    def warmup_label(fit_steps: int) -> str:
        return f"regression warm-up {fit_steps:,} steps, then VSD {distill.steps:,} steps (512 teacher pairs)"

    warmup, warmup_name, longer = warmup_of(distill.steps), warmup_label(distill.steps), distill.steps * 3 // 2
    regression_warmup = {
        f"recipe + {warmup_name}": warmup,
        f"recipe, full FT student (1e-4) + {warmup_name}": {**full_student, **warmup},
        f"recipe + guidance 4.5 + {warmup_name}": {**warmup, "guidance_scale": 4.5},
        f"recipe + {warmup_label(longer)}": warmup_of(longer),
        f"recipe + regression warm-up {distill.steps:,} steps on 1,024 teacher pairs, then VSD {distill.steps:,} "
        "steps": {**warmup, "regression_pairs": 1024},
        f"recipe + {warmup_name}, DMD regression loss 1 during VSD": {**warmup, "regression_weight": 1.0},
        f"recipe at LoRaD r = {2 * distill.student_rank} + {warmup_name}": {
            **warmup, "student_rank": 2 * distill.student_rank},
        f"recipe + {warmup_label(half)}": warmup_of(half),
        f"recipe + guidance 4.5, 4 fake updates per step + {warmup_name}": {**warmup, **stronger},
    }
    return {FIRST_RECIPE: first_recipe, COMBINATIONS: combinations, RECIPE: recipe, DMD_REGRESSION: dmd,
            REGRESSION_WARMUP: regression_warmup}


def recipe_search(distill: DistillConfig) -> dict[str, dict]:
    """The search for a tiny recipe whose one-step student reaches the teacher (notebook 03 §7c), as recipe
    overrides of the WaDi student in the order it was run: first single changes to the first tiny recipe (the
    pixel world's: LoRaD r = 19 at lr 1e-3, a LoRaD fake score of rank ``fake_rank`` at 1e-2, guidance 1.5 on
    both scores, half the generator steps), then the combinations that became ``distill``'s recipe, then single
    changes to that, then DMD's regression loss added to it (``VSDConfig.regression_weight``), then VSD started
    from a regression fit (``VSDConfig.regression_warmup_steps``); the first
    ``distill.recipe_variants`` of them (all when None; none for the paper's recipe). :func:`recipe_stages` names
    the stage of each."""
    variants = {name: overrides for stage in _recipe_search_by_stage(distill).values()
                for name, overrides in stage.items()}
    return dict(list(variants.items())[: distill.recipe_variants])


def recipe_stages(distill: DistillConfig) -> dict[str, str]:
    """The stage of each of :func:`recipe_search`'s variants: :data:`FIRST_RECIPE`, :data:`COMBINATIONS`,
    :data:`RECIPE`, :data:`DMD_REGRESSION` or :data:`REGRESSION_WARMUP`."""
    stages = {name: stage for stage, variants in _recipe_search_by_stage(distill).items() for name in variants}
    return {name: stages[name] for name in recipe_search(distill)}


def _artifact_key(backbone, prompts: list[str], config: VSDConfig) -> dict:
    return {
        "teacher": module_digest(backbone.denoiser),
        "text_encoder": module_digest(backbone.text_encoder),
        "prompts": prompts_digest(prompts),
        "vsd": config.key_dict(),
    }


def _new_student(teacher: nn.Module, config: VSDConfig) -> nn.Module:
    """Teacher copy with the config's student adapter at identity (what :func:`train_vsd` starts from)."""
    student = copy.deepcopy(teacher)
    inject(student, config.student_method, config.student_rank, "student")
    return student


def _one_step_config(backbone, config: VSDConfig) -> VSDConfig:
    """``config`` with the backbone's one-step ᾱ where the config leaves it open (PixArt: the official 0.0047).

    Raises:
        ValueError: the config sets another ᾱ than the backbone's, with which :func:`one_step_generate` and
            :func:`export_student` would sample the student.
    """
    if config.one_step_alpha_bar is None:
        return dataclasses.replace(config, one_step_alpha_bar=backbone.one_step_alpha_bar)
    if config.one_step_alpha_bar != backbone.one_step_alpha_bar:
        raise ValueError(f"VSDConfig.one_step_alpha_bar={config.one_step_alpha_bar} but backbone {backbone.name!r} "
                         f"samples its students with {backbone.one_step_alpha_bar} (None: the scheduler's); set "
                         "backbone.one_step_alpha_bar instead, so that training and inference agree")
    return config


EMBEDDING_CACHE_LIMIT_BYTES = 2 * 1024**3  # distill caches the prompts' text states up to this size


def distill(backbone, prompts: list[str], config: VSDConfig, out_dir: str | Path, max_steps: int | None = None,
            progress: bool = True, cache_embeddings: bool | None = None) -> VSDResult:
    """Distil ``backbone``'s denoiser into a one-step student with VSD (WaDi §3.3), in the denoiser's space
    (latent for SD, PixArt and the tiny SD; pixel for notebook 00's pixel worlds), resuming from the checkpoint in
    ``out_dir``.

    VSD needs no images, only prompts. They are encoded once and cached (:func:`prompt_embeddings`) when their
    text states fit in :data:`EMBEDDING_CACHE_LIMIT_BYTES` (``cache_embeddings=None``), else encoded as each
    step draws them (:class:`~.vsd.PromptEncoder`), as the official ``dataset.py`` does: 1.4M JourneyDB prompts
    would take 330 GB of SD1.5 text states. A ``config.one_step_alpha_bar`` of None takes the backbone's (PixArt:
    the official 0.0047). With ``config.regression_pairs`` > 0 the teacher first samples the
    ``config.regression_pairs`` pairs of DMD's regression loss and of the regression warm-up from the prompts
    (:func:`~.training_data.teacher_pairs`, DDIM with ``regression_teacher_steps`` steps at ``guidance_scale``,
    noise from ``seed``; cached).

    Raises:
        ValueError: no prompts, or a checkpoint in ``out_dir`` from another config.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("distill needs a non-empty list of prompt strings")
    config = _one_step_config(backbone, config)
    null = backbone.null_embedding()
    if cache_embeddings is None:
        cache_embeddings = len(prompts) * null[0].numel() * 4 <= EMBEDDING_CACHE_LIMIT_BYTES
    from accelerate import PartialState

    with PartialState().main_process_first():  # under accelerate launch the main process writes the caches first
        embeds = prompt_embeddings(backbone, prompts) if cache_embeddings else \
            PromptEncoder(prompts, backbone.encode_prompts)
        pairs = None if config.regression_pairs == 0 else teacher_pairs(
            backbone, prompts, config.regression_pairs, config.seed, config.regression_teacher_steps,
            config.guidance_scale, progress=progress)
    return train_vsd(backbone.denoiser, backbone.scheduler, embeds, null, config, out_dir, max_steps=max_steps,
                     progress=progress, regression_pairs=pairs)


def load_or_train_student(
    profile: Profile,
    backbone,
    method: str,
    rank: int | None = None,
    progress: bool = True,
    **overrides,
) -> TrainedModel:
    """The tiny-world student ``method`` of ``profile`` (optionally another ``rank`` or recipe ``overrides``),
    loaded from ``data/`` when cached, else distilled from ``backbone`` with :func:`distill` on the unique
    captions of the training split. ``.config`` is its :class:`VSDConfig`, ``.log`` one row per generator step;
    the model is the teacher with the student adapter, unmerged (:func:`merged_copy` merges a copy).

    Raises:
        ArtifactError: the student is not cached and ``WADI_NO_TRAIN=1`` forbids training it, or the file is
            damaged, corrupt or from another config.
    """
    config = student_config(profile.distill, method, rank, **overrides)
    prompts = sorted(set(make_split("train", profile.world).captions))
    key = _artifact_key(backbone, prompts, config)

    def train() -> tuple[nn.Module, pd.DataFrame, dict[str, str]]:
        run_dir = cache_dir() / "vsd" / artifact_path(STUDENT_KIND, key).stem
        result = distill(backbone, prompts, config, run_dir, progress=progress)
        return result.ema_student or result.student, result.log, {"method": method}

    return load_or_train(STUDENT_KIND, key, lambda _: _new_student(backbone.denoiser, config), train, config=config,
                         label=f"{method} student", trainable_only=True)


@torch.no_grad()
def one_step_generate(student: nn.Module, backbone, prompts: list[str], seed: int = 0,
                      latents: torch.Tensor | None = None, batch_size: int = 256,
                      progress: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from one network call each (NFE = 1): x0 = (z − σ_T ε̂)/α_T at t = T−1
    (:func:`~wadi_core.diffusion.one_step_x0`, the backbone's one-step ᾱ), decoded by the backbone's VAE.

    z is drawn up front from ``seed`` (so images do not depend on ``batch_size``), or given as ``latents``
    (B, C, H, W), e.g. to compare with the exported pipeline called on the same ``latents``.

    Raises:
        ValueError: ``latents`` not of shape (len(prompts), *backbone.latent_shape).
        PipelineLoadError: a ``student`` of another world (see
            :func:`~wadi_core.backbones.denoisers.check_denoiser_matches`).
    """
    check_denoiser_matches(student, backbone)
    if latents is None:
        latents = backbone.noise(len(prompts), seed)
    else:
        backbone.check_latents(latents, len(prompts))
    parameter = next(student.parameters())
    latents = latents.to(device=parameter.device, dtype=parameter.dtype)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="one-step", disable=not progress):
        cond = backbone.encode_prompts(prompts[start : start + batch_size]).to(parameter.dtype)
        x0 = one_step_x0(student, latents[start : start + batch_size], cond, backbone.scheduler,
                         backbone.one_step_alpha_bar)
        out.append(backbone.decode(x0))
    return torch.cat(out)


def one_step_scheduler_config(backbone) -> dict:
    """An ``LCMScheduler`` config whose single step (t = T−1) returns the one-step x0 of :func:`one_step_generate`.

    LCM's step at t = 999 is c_skip·z + c_out·x0 with c_skip ≈ 2.5e-9 and c_out ≈ 1 − 1.3e-9 (its boundary
    condition at timestep_scaling 10), and x0 = (z − √(1−ᾱ_999) ε̂)/√ᾱ_999 from its own ᾱ. With the backbone's
    schedule ᾱ_999 is the scheduler's; where the backbone fixes the one-step ᾱ (PixArt's official 0.0047), the
    betas are rewritten so that ᾱ_t = max(ᾱ_t, ᾱ_one-step) and ᾱ_999 equals it (β = 0 where the schedule
    would fall below).
    """
    from diffusers import LCMScheduler

    known = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in backbone.scheduler.config.items() if k in known}
    config.update(clip_sample=False, thresholding=False)  # the one-step x0 is never clipped
    if backbone.one_step_alpha_bar is not None:
        alphas_cumprod = backbone.scheduler.alphas_cumprod.double().clamp_min(backbone.one_step_alpha_bar)
        alphas_cumprod[-1] = backbone.one_step_alpha_bar
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        config["trained_betas"] = (1 - alphas_cumprod / previous).tolist()
    return config


def export_student(student: nn.Module, backbone, folder: str | Path) -> Path:
    """Save the merged student as a pipeline folder that stock diffusers runs in one step (WaDi §3.3).

    Latent backbones: a full ``StableDiffusionPipeline`` / ``PixArtAlphaPipeline`` folder, the merged denoiser
    beside the backbone's text encoder, tokenizer and VAE, and an ``LCMScheduler`` whose single step returns the
    one-step x0 (:func:`one_step_scheduler_config`)::

        pipe = DiffusionPipeline.from_pretrained(folder)
        images = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=z, output_type="pt").images

    equals ``one_step_generate(student, backbone, prompts, latents=z)``. A pixel-space backbone (the tiny world)
    has no pipeline class in diffusers: its export is the merged ``UNet2DConditionModel`` folder alone. Either
    way the merged student costs exactly a plain denoiser call, and ``student`` itself is untouched.

    The folder is written next to its destination and renamed into place; an existing export there is replaced.

    Raises:
        FileExistsError: ``folder`` exists and is not a previous export (no ``model_index.json`` / ``config.json``).
    """
    folder = Path(folder)
    if folder.exists() and not any((folder / name).is_file() for name in ("model_index.json", "config.json")):
        raise FileExistsError(f"{folder} exists and is not an exported student; choose another folder")
    merged = merged_copy(student).requires_grad_(False).eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if backbone.vae is None:
            merged.save_pretrained(staging, safe_serialization=True)
        else:
            _export_pipeline(merged, backbone, staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _export_pipeline(merged: nn.Module, backbone, folder: Path) -> None:
    import diffusers

    scheduler = diffusers.LCMScheduler.from_config(one_step_scheduler_config(backbone))
    components = dict(tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder, vae=backbone.vae,
                      scheduler=scheduler)
    if backbone.pipeline_class == "StableDiffusionPipeline":
        pipeline = diffusers.StableDiffusionPipeline(unet=merged, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False, **components)
    elif backbone.pipeline_class == "PixArtAlphaPipeline":
        pipeline = diffusers.PixArtAlphaPipeline(transformer=merged, **components)
    else:
        raise ValueError(f"cannot export a student of a {backbone.pipeline_class!r} backbone")
    pipeline.save_pretrained(folder, safe_serialization=True)
