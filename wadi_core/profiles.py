"""Run profiles: every size, step count, seed, learning rate and eval-set size in one place.

| profile | backbone | where | purpose |
|---|---|---|---|
| ``smoke`` | ``tiny-smoke`` | any CPU, CI | proves every notebook runs headlessly; no quality claims |
| ``tiny``  | ``tiny`` | any CPU, offline | the committed, readable reproduction on the latent tiny SD (default) |
| ``paper-smoke`` | ``smoke-sd15`` | any CPU, CI | the paper code path on a random-weight SD1.5-structured pipeline |
| ``paper`` | ``sd15`` | GPU + model hub | SD1.5 / SD2.1-base / PixArt-α at paper scale (:class:`PaperDataConfig`) |

Notebooks read a profile with :func:`get_profile` and pass its sub-configs explicitly to ``wadi_core``
functions; nothing else holds a magic number. Each sub-config is a frozen dataclass whose hash names the
artifact it produces (see :mod:`wadi_core.artifacts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PROFILE_NAMES = ("smoke", "tiny", "paper-smoke", "paper")


@dataclass(frozen=True)
class WorldConfig:
    """ShapesWorld sizes (``docs/design.md#the-tiny-world``). Seeds of the splits are disjoint by construction."""

    resolution: int = 32  # pixels per side, as in the tiny teacher's sample_size
    train_size: int = 20_000  # captioned training images (teacher, tiny CLIP, reader)
    validation_size: int = 256  # prompt sheet for picking the guidance scale
    coco14_size: int = 2_048  # `coco14-like` held-out captions + reference images (COCO-2014 30k analog)
    coco17_size: int = 1_024  # `coco17-like` held-out captions + reference images (COCO-2017 5k analog)
    two_object_fraction: float = 0.5  # share of two-object (relation) scenes
    seed: int = 0


@dataclass(frozen=True)
class ClipTrainConfig:
    """Tiny CLIP (text + vision towers) trained contrastively on ShapesWorld."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 16  # tokens, incl. BOS/EOS
    vocab_size: int = 400  # BPE target size; the grammar saturates at 330 (every word one token)
    patch_size: int = 4
    projection_dim: int = 64
    steps: int = 1_000
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 1


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Pixel-space teacher UNet2DConditionModel, ε-prediction, SD1.5 DDPM schedule.

    Why pixel space and this schedule: ``docs/paper_notes.md#tiny-world-architecture``.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_heads: int = 4
    steps: int = 6_000
    batch_size: int = 32
    lr: float = 1e-3
    lr_min: float = 1e-4  # cosine decay floor
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # null-prompt dropout for classifier-free guidance
    ema_decay: float = 0.999
    seed: int = 2


def latent_teacher_config(**overrides) -> TeacherTrainConfig:
    """The latent tiny teacher: SD1.5's pattern (cross-attention at every level but the lowest, 16 and 8 here, and
    in the mid block) on 4×16×16 VAE latents; otherwise the pixel teacher's recipe."""
    fields = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), seed=8)
    return TeacherTrainConfig(**{**fields, **overrides})


@dataclass(frozen=True)
class VAETrainConfig:
    """Tiny ``AutoencoderKL`` of the latent tiny world: 2 levels (f = 2), so 32×32 images are 4×16×16 latents."""

    block_out_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4  # as SD's VAE
    layers_per_block: int = 1
    steps: int = 1_500
    batch_size: int = 32
    lr: float = 1e-3
    lr_min: float = 1e-4  # cosine decay floor
    l1_weight: float = 0.1  # loss = MSE + l1_weight·L1 + kl_weight·KL (SD's VAE adds LPIPS and a GAN term)
    kl_weight: float = 1e-6
    scaling_samples: int = 2_048  # training images whose latent std sets scaling_factor, as SD's was set
    seed: int = 7


@dataclass(frozen=True)
class ReaderTrainConfig:
    """ShapesWorld feature network (Inception analog for FID) + attribute reader."""

    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    steps: int = 2_000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 3


@dataclass(frozen=True)
class SamplingConfig:
    """Multi-step teacher sampling (Table 1's teacher row: DDIM 25 steps, CFG 3 on SD)."""

    num_inference_steps: int = 25
    guidance_scale: float = 3.0  # the paper's SD value; the tiny teacher's own pick is `tiny_guidance_scale`
    tiny_guidance_scale: float = 1.5
    guidance_sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.5)
    sweep_prompts: int = 64  # validation sheet used to pick the tiny CFG
    eval_samples: int = 512  # teacher samples scored on `coco14-like`
    batch_size: int = 128
    seed: int = 4


@dataclass(frozen=True)
class AdapterStudyConfig:
    """Notebook 02: expressivity fits on teacher Linears and the LoRaD cost benchmark."""

    layers: tuple[str, ...] = (  # teacher Linears whose weights the synthetic targets start from
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    )
    methods: tuple[str, ...] = ("lora", "dora", "dora_frozen_norm", "lorad")
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    direction_change: float = 0.0221  # mean 1 − cos of a fully fine-tuned one-step student (paper: 2.21 %)
    target_rank_fraction: float = 0.1  # rank of the synthetic direction residual / min(out, in)
    fit_steps: int = 300
    fit_lr: float = 1e-2
    bench_quick: bool = False  # True: small shapes and rank (seconds); False: SD1.5 shapes at rank 256
    bench_repeats: int = 3
    seed: int = 5


@dataclass(frozen=True)
class DistillConfig:
    """Notebook 03: the tiny-world VSD recipe shared by every student, and WaDi's adapter and student-rank
    ablations. Paper values are in :class:`wadi_core.distill.VSDConfig`'s defaults; deviations are named here."""

    # The latent tiny SD's recipe, chosen by its recipe study (docs/paper_notes.md#latent-tiny-world): ranks at the
    # paper's trainable shares of the 1.49 M-parameter tiny U-Net, and two named deviations of the fake score.
    student_rank: int = 15  # LoRaD r=15: 9.75 % of the U-Net (paper r=256 on SD1.5: 83.8 M = 9.75 %)
    baseline_rank: int = 16  # LoRA/DoRA r=16: 1.41× LoRaD's count (paper's adapter ablation: 120.9 M / 83.8 M)
    fake_method: str = "full"  # paper: LoRaD r=32 (fake_rank is then unused)
    fake_rank: int = 3
    rank_ablation: tuple[int, ...] = (4, 8, 15, 30)  # the analogs of 64/128/256/512
    # Learning rates per student method, each the best of `lr_sweep` (paper: 1e-4 for every student).
    student_lrs: tuple[tuple[str, float], ...] = (
        ("lorad", 3e-3), ("full", 1e-4), ("lora", 1e-3), ("dora", 1e-3), ("dora_frozen_norm", 1e-3),
    )
    fake_lr: float = 1e-4  # paper: 1e-2 for the LoRaD fake score
    # The fair comparison: every student method's lr from one sweep at one short budget, chosen by FID; the
    # final rows and both ablations then run at `seeds` (mean ± spread; wadi_core.distill.studies).
    lr_sweep: tuple[float, ...] = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    lr_sweep_steps: int = 200
    seeds: tuple[int, ...] = (6, 7, 8)
    guidance_scale: float = 3.0  # the tiny teacher's best CFG (notebook 00); paper: 1.5
    fake_guidance_scale: float | None = 1.0  # paper: None (the fake score guided like the teacher)
    batch_size: int = 16  # paper: 128
    steps: int = 1000  # generator steps (paper: 22.2k); ≈ 22 CPU-minutes per student on one thread
    # Deviations from the official loop: keep the fake score ahead of the generator
    # (docs/paper_notes.md#tiny-vsd-recipe).
    fake_warmup_steps: int = 30  # paper: 0
    fake_updates_per_step: int = 2  # paper: 1
    normalize_generator_grad: bool = False  # paper: False (DMD's per-sample normalisation)
    ema_decay: float | None = None  # paper: None
    checkpoint_every: int = 100
    # The deviation study: each deviation switched on/off alone, in shorter runs.
    deviation_steps: int = 300
    deviation_ema_decay: float = 0.99  # the paper's optional 0.999 barely moves in a few hundred steps
    # The recipe search (notebook 03 §7c, wadi_core.distill.recipe_search): every variant tried on the way to this
    # recipe, scored on `lr_sweep_prompts` (records data/recipe_scores-*.json); how many of them to run (None: all;
    # 0 where the recipe is the paper's own).
    recipe_variants: int | None = None
    # The regression reference beside it (wadi_core.distill.regression_ceiling): (student method, teacher sample
    # pairs, steps) of one-step students fitted to the teacher's own DDIM samples instead of distilled by VSD; the
    # full fine-tune at 1,000 (the distillation's steps), 4,000 and 8,000 steps tells a budget limit from a capacity
    # limit, and LoRaD at 4,000 whether its reach (Linears only) limits it. Notebook 03 also scores the longest fit
    # on all the evaluation prompts.
    regression_runs: tuple[tuple[str, int, int], ...] = (
        ("lorad", 1_024, 1_000), ("lorad", 4_096, 4_000), ("full", 4_096, 1_000), ("full", 4_096, 4_000),
        ("full", 4_096, 8_000),
    )
    eval_prompts: int = 2_048  # every coco14-like prompt: the real-vs-real floor falls from 512 prompts' (notebook 04)
    lr_sweep_prompts: int = 512  # coco14-like prompts the lr sweep's points are scored on (its FIDs rank lrs only)
    # The world study (notebook 00, wadi_core.distill.world_study): per candidate world, the generator steps that fit
    # in the latent student's `steps`, and the SD1.5-attention pixel teacher's steps that fit in the latent teacher's
    # training, from `make bench`'s benchmarks_worlds table (1 thread).
    world_study_steps: tuple[tuple[str, int], ...] = (("pixel", 892), ("pixel_sd15_attention", 142), ("latent", 1_000))
    world_study_teacher_steps: int = 838
    world_study_prompts: int = 512
    seed: int = 6

    @property
    def longest_regression_run(self) -> tuple[str, int, int] | None:
        """The (method, pairs, steps) of ``regression_runs`` with the most steps, which notebook 03 also scores on
        all the evaluation prompts; None when there is none."""
        return max(self.regression_runs, key=lambda run: run[2], default=None)


@dataclass(frozen=True)
class ControlNetConfig:
    """Notebook 05 §1: a ``ControlNetModel`` trained on the multi-step teacher, used unchanged with the one-step
    student (WaDi's downstream section). diffusers' ``train_controlnet.py`` recipe: ``from_unet`` initialisation,
    the ε-loss, constant lr after warm-up; 50 % empty prompts as in the ControlNet paper (Zhang et al. 2023, §3.2)."""

    conditions: tuple[str, ...] = ("mask", "edge")  # ShapesWorld's condition maps (segmentation / canny analogs)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32)  # one 2× downsampling: 32-px maps → 16² latents
    steps: int = 800
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 50
    caption_dropout: float = 0.5
    eval_maps: int = 512  # held-out coco14-like condition maps the tasks are measured on
    conditioning_scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # the one-step student's residual scale sweep
    timing_images: int = 32  # images per wall-time measurement
    timing_steps: tuple[int, ...] = (25, 50)  # teacher DDIM steps timed (the paper's ControlNet timing: DDIM-50)
    mask_threshold: float = 0.25  # a generated pixel is "object" when its brightest channel exceeds this (0..1)
    # Released ControlNets used instead of training one (paper profile): (condition, hub id or local folder).
    pretrained: tuple[tuple[str, str], ...] = ()
    seed: int = 9


@dataclass(frozen=True)
class HighResConfig:
    """Notebook 05 §2: the one-step student above its training size, naively and with ScaleCrafter's re-dilation
    (He et al. 2023): the 3×3 convolutions of the listed blocks dilated during the step."""

    sizes: tuple[tuple[int, int], ...] = ((2, 2), (2, 7 / 2))  # (height, width) in training sides: 1024², 1024×1792
    # Blocks whose resnet and upsampler convolutions are re-dilated ({block: dilation}); "lowest" names the U-Net's
    # lowest-resolution level: its last down block, the mid block and the first up block (ScaleCrafter's SD1.5
    # 1024² setting, down_blocks.3 / mid_block / up_blocks.0 dilated by 2).
    redilation: tuple[tuple[str, int], ...] = (("lowest", 2),)
    prompts: int = 512  # coco14-like prompts per size
    min_component_pixels: int = 3  # connected components smaller than this (at the training size) are not objects
    seed: int = 10


@dataclass(frozen=True)
class ReVersionConfig:
    """Notebook 05 §3: relation inversion (ReVersion, Huang et al. 2024): one new token learned in the frozen text
    encoder from exemplars of a relation the captions never name, with the denoising loss, relation-focal
    timesteps f(t) ∝ 1 − α·cos(πt/T) and the relation-steering InfoNCE (τ = 0.07, weight 0.01; the paper's values).
    """

    token: str = "<R>"  # the placeholder; must be new to the tokenizer
    relation: str = "above"  # ShapesWorld draws it but captions it "and" (wadi_core.world.scenes)
    # ReVersion initialises <R> from "and"; here "and" already means "above" (the world's caption of it), so the
    # token starts from a neutral function word of the captions instead.
    initializer: str = "the"
    exemplars: int = 10  # exemplar images ("X above Y"), as ReVersion's ~10 per relation
    positives: tuple[str, ...] = ("left", "right", "below", "of", "at", "in")  # the preposition prior
    num_positives: int = 4  # prepositions sampled per step
    steering_weight: float = 0.01
    temperature: float = 0.07
    focal_alpha: float = 0.5
    steps: int = 400
    batch_size: int = 8
    lr: float = 5e-3
    eval_pairs: int = 128  # held-out (colour, shape) pairs measured, none of them in an exemplar
    eval_seeds: int = 2  # images per pair
    timing_images: int = 32
    seed: int = 11


@dataclass(frozen=True)
class DreamBoothConfig:
    """Notebook 05 §4: DreamBooth-style customisation (Ruiz et al. 2023) of the teacher and of the one-step student
    with LoRaD vs LoRA vs DoRA at equal trainable parameters: a rare token for a subject the world never drew,
    prior preservation with the model's own samples of the class word."""

    subject_shape: str = "cross"  # a plus sign: outside ShapesWorld's grammar (wadi_core.world.render)
    subject_color: str = "yellow"
    class_word: str = "square"  # the nearest shape word the captions have
    subject_token: str | None = None  # None: a rare single token the captions never use (SD1.5: "sks")
    exemplar_folder: str | None = None  # a folder of subject images (paper path); None renders the tiny subject
    exemplars: int = 5
    prior_prompt: str = "a {color} {class_word}"  # the class prompts, {color} cycling over ShapesWorld's colours
    prior_images: int = 64  # the class word's own samples (prior preservation)
    prior_weight: float = 1.0
    methods: tuple[str, ...] = ("lorad", "lora", "dora")
    rank: int = 4  # LoRaD's rank; LoRA's and DoRA's are matched to its trainable parameters
    steps: int = 1000
    # Each method's lr is notebook 03's best distillation lr for it times this factor (one factor for all). At ×1
    # and 300 steps no customised model drew the subject's plus sign; at ×3 and 1,000 steps the student does.
    lr_scale: float = 3.0
    batch_size: int = 4  # subject images per step (and as many prior images)
    subject_images: int = 64  # images of the plain subject prompt "a <S> {class_word}" (subject fidelity, shape)
    eval_seeds: int = 2  # images per colour × position prompt (prompt fidelity, prior drift)
    seed: int = 12


@dataclass(frozen=True)
class PaperDataConfig:
    """The data and released models the paper path reads (docs/paper_notes.md#evaluation-protocols); paths are
    relative to the working directory or absolute. Only the paper-scale cells of notebooks 01 and 04 use them."""

    train_prompts: str = "data/journeydb/train_anno.jsonl"  # JourneyDB captions (official dataset.py)
    coco2014_annotations: str = "data/coco/annotations/captions_val2014.json"  # COCO-2014 30k (SwiftBrush-v2)
    coco2014_images: str = "data/coco/val2014"
    coco2017_annotations: str = "data/coco/annotations/captions_val2017.json"  # COCO-2017 5k
    coco2017_images: str = "data/coco/val2017"
    # (label, teacher, student) of notebook 01's weight analysis: backbone names, pipeline or model folders, hub
    # ids, or .safetensors state dicts (the released merged WaDi U-Nets) loaded strictly into the teacher's class.
    weight_pairs: tuple[tuple[str, str, str], ...] = (
        ("DMD2 vs SD1.5", "sd15", "models/dmd2_sd15_unet.safetensors"),
        ("PixArt-α DMD vs PixArt-α", "PixArt-alpha/PixArt-XL-2-512x512", "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"),
        ("WaDi vs SD1.5 (released)", "sd15", "models/rotated_unet-sdv1-5.safetensors"),
    )


@dataclass(frozen=True)
class Profile:
    name: str
    backbone: str = "tiny"  # wadi_core.backbones.load_backbone(config.backbone) in every model notebook
    world: WorldConfig = field(default_factory=WorldConfig)
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    latent_teacher: TeacherTrainConfig = field(default_factory=latent_teacher_config)
    reader: ReaderTrainConfig = field(default_factory=ReaderTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    adapters: AdapterStudyConfig = field(default_factory=AdapterStudyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    reversion: ReVersionConfig = field(default_factory=ReVersionConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    paper_data: PaperDataConfig = field(default_factory=PaperDataConfig)
    needs_gpu: bool = False

    @property
    def seeds(self) -> dict[str, int]:
        """Every seed of the profile, for `results/manifest.json`."""
        return {
            name: getattr(self, name).seed
            for name in ("world", "clip", "teacher", "vae", "reader", "sampling", "adapters", "distill", "controlnet",
                         "highres", "reversion", "dreambooth")
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _smoke(name: str = "smoke", backbone: str = "tiny-smoke") -> Profile:
    # Mechanics only: a few steps of everything, tiny eval sets (FID needs more images than feature dims).
    return Profile(
        name=name,
        backbone=backbone,
        world=WorldConfig(train_size=512, validation_size=16, coco14_size=160, coco17_size=160),
        clip=ClipTrainConfig(steps=5, batch_size=32),
        teacher=TeacherTrainConfig(steps=5, batch_size=8, warmup_steps=2),
        vae=VAETrainConfig(steps=5, batch_size=8, scaling_samples=64),
        latent_teacher=latent_teacher_config(steps=5, batch_size=8, warmup_steps=2),
        reader=ReaderTrainConfig(steps=5, batch_size=32),
        sampling=SamplingConfig(
            num_inference_steps=2, guidance_sweep=(1.0, 3.0), sweep_prompts=4, eval_samples=160, batch_size=80
        ),
        adapters=AdapterStudyConfig(ranks=(1, 2), fit_steps=3, bench_quick=True, bench_repeats=1),
        distill=DistillConfig(student_rank=2, baseline_rank=2, fake_rank=1, rank_ablation=(1, 2), batch_size=4,
                              steps=3, fake_warmup_steps=1, checkpoint_every=2, deviation_steps=2,
                              lr_sweep=(1e-4, 1e-3), lr_sweep_steps=2, seeds=(6, 7), eval_prompts=160,
                              lr_sweep_prompts=160, world_study_prompts=160, world_study_teacher_steps=5,
                              world_study_steps=(("pixel", 2), ("pixel_sd15_attention", 2), ("latent", 3)),
                              recipe_variants=2, regression_runs=(("lorad", 8, 3),)),
        controlnet=ControlNetConfig(steps=3, batch_size=4, warmup_steps=1, eval_maps=32,
                                    conditioning_scales=(0.5, 1.0), timing_images=4, timing_steps=(2,)),
        highres=HighResConfig(prompts=32),
        reversion=ReVersionConfig(exemplars=4, steps=3, batch_size=2, eval_pairs=8, eval_seeds=1, timing_images=4),
        dreambooth=DreamBoothConfig(exemplars=4, prior_images=4, rank=2, steps=3, batch_size=2, subject_images=4,
                                    eval_seeds=1),
    )


def _paper() -> Profile:
    # The paper's world runs SD-scale backbones from the model hub on a GPU; its sizes are those of the
    # COCO protocols (docs/paper_notes.md#evaluation-protocols). Tiny-world training configs do not apply there.
    return Profile(
        name="paper",
        backbone="sd15",
        world=WorldConfig(coco14_size=30_000, coco17_size=5_000),
        sampling=SamplingConfig(eval_samples=30_000, guidance_scale=3.0, batch_size=16),
        distill=DistillConfig(  # the official recipe (train_dkd_sd1.5.sh), no tiny-world deviations
            student_rank=256, baseline_rank=256, fake_rank=32, rank_ablation=(64, 128, 256, 512),
            student_lrs=tuple((m, 1e-4) for m in ("lorad", "full", "lora", "dora", "dora_frozen_norm")),
            lr_sweep=(1e-4,), lr_sweep_steps=2_000, seeds=(0,),
            fake_method="lorad", fake_lr=1e-2, guidance_scale=1.5, fake_guidance_scale=None,
            batch_size=128, steps=22_200, fake_warmup_steps=0, fake_updates_per_step=1, checkpoint_every=500,
            eval_prompts=30_000, lr_sweep_prompts=5_000, recipe_variants=0, regression_runs=(),
        ),
        # The released SD1.5 canny ControlNet (ShapesWorld's edge maps play its canny maps), ScaleCrafter's SD1.5
        # 1024² re-dilation ("lowest": down_blocks.3 / mid_block / up_blocks.0 by 2) at 1024² and 1024×1792.
        controlnet=ControlNetConfig(conditions=("edge",), pretrained=(("edge", "lllyasviel/sd-controlnet-canny"),),
                                    eval_maps=5_000),
        highres=HighResConfig(prompts=1_000),
        # DreamBooth's rare token on SD1.5; its subject folder is the user's (e.g. a DreamBooth dataset subject).
        dreambooth=DreamBoothConfig(subject_token="sks", class_word="dog", exemplar_folder="data/dreambooth/dog",
                                    prior_prompt="a photo of a {class_word}",
                                    prior_images=200, rank=64, steps=800, lr_scale=1.0, batch_size=1,
                                    eval_seeds=4),
        needs_gpu=True,
    )


def _paper_smoke() -> Profile:
    # The smoke profile's sizes on the random-weight SD1.5-structured pipeline (wadi_core.backbones.smoke): every
    # notebook's code path on a latent diffusers pipeline, in seconds; notebook 01 and 04's paper cells read
    # files the run writes itself (paper_smoke_data).
    return _smoke(name="paper-smoke", backbone="smoke-sd15")


_PROFILES = {"smoke": _smoke, "tiny": lambda: Profile(name="tiny"), "paper-smoke": _paper_smoke, "paper": _paper}


def get_profile(name: str = "tiny") -> Profile:
    """Return the named profile; ``paper`` raises unless a GPU is present (the hub check comes at load time)."""
    if name not in _PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}")
    profile = _PROFILES[name]()
    if profile.needs_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "profile 'paper' needs a GPU and model-hub access (SD1.5 / SD2.1-base / PixArt-α weights, "
                "COCO captions); run the notebooks with profile='tiny' on this machine"
            )
    return profile
