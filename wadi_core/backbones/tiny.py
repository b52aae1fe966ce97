"""The tiny world's pixel-space backbone (``"tiny-pixel"``), built in Stable Diffusion's mould (docs/design.md);
its tokenizer and tiny CLIP are also those of the latent tiny SD (:mod:`.tiny_sd`).

- ``CLIPTokenizer`` (BPE trained on the caption grammar) + tiny ``CLIPModel`` trained contrastively on
  ShapesWorld; its frozen text tower conditions the teacher exactly as SD's frozen CLIP text encoder does.
- Teacher: pixel-space ``UNet2DConditionModel`` (cross-attention only at 8×8 and in the mid block, for CPU
  speed), ε-prediction, 10 % caption dropout for classifier-free guidance.
- Scheduler: SD1.5's exact DDPM config (1000 steps, scaled_linear 0.00085→0.012), so ᾱ at t=999 is 0.0047,
  the value WaDi's one-step formula assumes (the official ``train_dkd_sd.py`` hard-codes it).

This pixel world came first (at 32×32 a VAE with f = 4 leaves 8×8 latents that lose the small objects);
the latent tiny SD (:mod:`.tiny_sd`, f = 2) is now ``"tiny"``, and the committed notebooks run on this one until
they are re-executed on it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

from ..artifacts import TrainedModel, load_or_train
from ..optim import cosine_lr, set_lr
from ..profiles import ClipTrainConfig, Profile, TeacherTrainConfig, WorldConfig
from ..world import ShapesDataset, make_split
from .backbone import Backbone

# SD1.5's scheduler config (stable-diffusion-v1-5, scheduler/scheduler_config.json). Each scheduler class
# takes the fields it knows, as `from_config` does when a pipeline swaps schedulers.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    prediction_type="epsilon",
)


def make_scheduler() -> DDPMScheduler:
    """SD1.5's DDPM scheduler: ᾱ_999 = 0.0047, i.e. the one-step x0 formula amplifies ε errors by 14.6."""
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and tiny CLIP
# --------------------------------------------------------------------------------------------------------------


def train_tokenizer(captions: list[str], config: ClipTrainConfig) -> CLIPTokenizer:
    """CLIP BPE tokenizer (CLIP's pre-tokenizer, ``</w>`` suffix, BOS/EOS) trained on the caption grammar."""
    base = CLIPTokenizer(model_max_length=config.max_length)
    return base.train_new_from_iterator(captions, vocab_size=config.vocab_size, show_progress=False)


def _tokenizer_files(tokenizer: CLIPTokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return json.dumps({p.name: p.read_text() for p in sorted(Path(tmp).iterdir())})


def _tokenizer_from_files(files: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in json.loads(files).items():
            (Path(tmp) / name).write_text(text)
        return CLIPTokenizer.from_pretrained(tmp)


def clip_model_config(config: ClipTrainConfig, tokenizer: CLIPTokenizer, resolution: int) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=config.projection_dim,
    )
    vision = CLIPVisionConfig(
        image_size=resolution,
        patch_size=config.patch_size,
        num_channels=3,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        projection_dim=config.projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=config.projection_dim)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, max_length), padded like SD's pipeline (``padding="max_length"``, truncation)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def clip_embeddings(model: CLIPModel, input_ids: torch.Tensor,
                    pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm projected text and image embeddings (B, projection_dim) of the tiny CLIP."""
    text = model.text_projection(model.text_model(input_ids=input_ids).pooler_output)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1)


def contrastive_loss(model: CLIPModel, input_ids: torch.Tensor, pixels: torch.Tensor, caption_ids: torch.Tensor):
    """Symmetric InfoNCE where every pair sharing a caption counts as a positive (the grammar repeats captions)."""
    text, image = clip_embeddings(model, input_ids, pixels)
    logits = model.logit_scale.exp() * image @ text.T  # (B, B)
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _clip_artifact_config(world: WorldConfig, config: ClipTrainConfig) -> dict:
    return {"world": world, "clip": config}


def train_tiny_clip(train: ShapesDataset, config: ClipTrainConfig) -> tuple[CLIPModel, CLIPTokenizer, dict]:
    """Train the tokenizer, then the tiny CLIP contrastively (AdamW, cosine lr) on a ShapesWorld split."""
    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(train.captions, config)
    model = CLIPModel(clip_model_config(config, tokenizer, train.images.shape[-1]))
    input_ids = tokenize(tokenizer, train.captions)
    _, caption_ids = torch.unique(input_ids, dim=0, return_inverse=True)
    pixels = train.images_float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    log: dict[str, list[float]] = {"step": [], "loss": [], "seconds": []}
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(config.steps), desc="tiny CLIP", mininterval=2.0):
        batch = torch.randint(len(train), (config.batch_size,), generator=generator)
        loss = contrastive_loss(model, input_ids[batch], pixels[batch], caption_ids[batch])
        set_lr(optimizer, cosine_lr(step, config.steps, config.lr, config.lr / 10, warmup_steps=config.steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for key, value in (("step", step), ("loss", loss.item()), ("seconds", time.perf_counter() - start)):
            log[key].append(float(value))
    return model.eval(), tokenizer, log


def load_or_train_tiny_clip(profile: Profile) -> TrainedModel:
    """The tiny CLIP of ``profile`` with its tokenizer (``.tokenizer``): loaded from ``data/`` when cached, else
    trained and saved. The tokenizer is always rebuilt from the files stored in the checkpoint."""

    def build(metadata: dict[str, str]) -> CLIPModel:
        return CLIPModel(CLIPConfig.from_dict(json.loads(metadata["model_config"])))

    def train() -> tuple[CLIPModel, dict, dict[str, str]]:
        model, tokenizer, log = train_tiny_clip(make_split("train", profile.world), profile.clip)
        return model, log, {"tokenizer": _tokenizer_files(tokenizer), "model_config": model.config.to_json_string()}

    clip = load_or_train("tiny_clip", _clip_artifact_config(profile.world, profile.clip), build, train,
                         config=profile.clip)
    clip.tokenizer = _tokenizer_from_files(clip.metadata["tokenizer"])
    return clip


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The frozen text tower of the tiny CLIP as a stand-alone ``CLIPTextModel`` (SD's text encoder role)."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Teacher UNet
# --------------------------------------------------------------------------------------------------------------


def teacher_unet_config(config: TeacherTrainConfig, resolution: int, cross_attention_dim: int,
                        channels: int = 3) -> dict:
    """``UNet2DConditionModel`` kwargs of a tiny teacher (diffusers' config, recorded in the checkpoint):
    ``channels`` 3 for the pixel teacher, the VAE's 4 latent channels for the latent one."""
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(config.block_out_channels),
        down_block_types=list(config.down_block_types),
        up_block_types=list(config.up_block_types),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_heads,  # diffusers reads this as the number of heads
        norm_num_groups=8,
    )


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Per-token text states (B, L, D): the UNet's ``encoder_hidden_states``, as SD uses CLIP's last layer."""
    return text_encoder(input_ids=tokenize(tokenizer, prompts)).last_hidden_state


def denoiser_step(unet: UNet2DConditionModel, optimizer: torch.optim.Optimizer, scheduler: DDPMScheduler,
                  x0: torch.Tensor, text_states: torch.Tensor, null_state: torch.Tensor, config: TeacherTrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """One training step of :func:`train_denoiser`: ``config.batch_size`` examples of ``x0`` and their text states
    (``config.caption_dropout`` of them replaced by ``null_state``), noised at t ~ U[0, T), the MSE of the predicted
    ε, backward, gradient clipping at 1.0 and ``optimizer.step()``; every draw from ``generator``. Returns the
    loss."""
    batch = torch.randint(len(x0), (config.batch_size,), generator=generator)
    target = x0[batch]
    noise = torch.randn(target.shape, generator=generator)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
    drop = torch.rand(len(batch), generator=generator) < config.caption_dropout
    cond = torch.where(drop[:, None, None], null_state.expand_as(text_states[batch]), text_states[batch])
    pred = unet(scheduler.add_noise(target, noise, t), t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    return loss


def train_denoiser(
    x0: torch.Tensor, text_states: torch.Tensor, null_state: torch.Tensor, config: TeacherTrainConfig,
    unet_config: dict,
) -> tuple[UNet2DConditionModel, dict]:
    """ε-prediction training of a ``UNet2DConditionModel`` on ``x0`` (N, C, H, W) (pixels, or scaled VAE latents)
    with SD1.5's schedule, caption dropout and an EMA of the weights (returned)."""
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**unet_config)
    ema = UNet2DConditionModel(**unet.config).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    log: dict[str, list[float]] = {"step": [], "loss": [], "lr": [], "seconds": []}
    start = time.perf_counter()
    unet.train()
    for step in tqdm(range(config.steps), desc="teacher UNet", mininterval=5.0):
        lr = cosine_lr(step, config.steps, config.lr, config.lr_min, config.warmup_steps)
        set_lr(optimizer, lr)
        loss = denoiser_step(unet, optimizer, scheduler, x0, text_states, null_state, config, generator)
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        seconds = time.perf_counter() - start
        for key, value in (("step", step), ("loss", loss.item()), ("lr", lr), ("seconds", seconds)):
            log[key].append(float(value))
    return ema.eval(), log


def unet_from_metadata(metadata: dict[str, str]) -> UNet2DConditionModel:
    """The frozen, untrained ``UNet2DConditionModel`` a teacher checkpoint's ``model_config`` describes."""
    return UNet2DConditionModel(**json.loads(metadata["model_config"])).requires_grad_(False)


def training_text_states(clip: TrainedModel, split: ShapesDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(captions' states (N, L, D), the empty prompt's (1, L, D)) from the frozen text tower of ``clip``."""
    text_encoder = text_encoder_from_clip(clip.model)
    return (encode_prompts(clip.tokenizer, text_encoder, split.captions),
            encode_prompts(clip.tokenizer, text_encoder, [""]))


def load_or_train_teacher(profile: Profile, clip: TrainedModel) -> TrainedModel:
    """The teacher of ``profile``: loaded from ``data/`` when cached, else trained on the frozen text tower of
    ``clip`` (:func:`load_or_train_tiny_clip`)."""
    key = {"clip": _clip_artifact_config(profile.world, profile.clip), "teacher": profile.teacher}

    def train() -> tuple[UNet2DConditionModel, dict, dict[str, str]]:
        split = make_split("train", profile.world)
        states, null_state = training_text_states(clip, split)
        unet_config = teacher_unet_config(profile.teacher, profile.world.resolution, states.shape[-1])
        unet, log = train_denoiser(split.images_float(), states, null_state, profile.teacher, unet_config)
        return unet.requires_grad_(False), log, {"model_config": json.dumps(unet_config)}

    return load_or_train("teacher_unet", key, unet_from_metadata, train, config=profile.teacher)


# --------------------------------------------------------------------------------------------------------------
# The tiny world as a Backbone
# --------------------------------------------------------------------------------------------------------------


def load_tiny_backbone(profile: Profile, name: str = "tiny-pixel") -> Backbone:
    """The pixel tiny world of ``profile`` as a :class:`Backbone` named ``name`` (pixel space: ``vae=None``), its
    CLIP and teacher loaded from ``data/`` (or, on a fresh machine, trained)."""
    clip = load_or_train_tiny_clip(profile)
    teacher = load_or_train_teacher(profile, clip)
    distill = profile.distill
    return Backbone(name=name, tokenizer=clip.tokenizer, text_encoder=text_encoder_from_clip(clip.model),
                    denoiser=teacher.model, scheduler=make_scheduler(), vae=None,
                    max_length=int(clip.tokenizer.model_max_length), student_rank=distill.student_rank,
                    fake_rank=distill.fake_rank, clip=clip.model.requires_grad_(False))
