"""ControlNet with a one-step student (WaDi's downstream section; notebook 05 §1).

The ControlNet is trained once, on the **multi-step teacher** (diffusers' ``train_controlnet.py``: initialised
with ``ControlNetModel.from_unet(teacher)``, the ε-loss, empty prompts for a share of the captions), and is then
used **unchanged** with a one-step student: one call at t = T−1 with the ControlNet's residuals added to the
student's skip connections and mid block, x0 by the one-step formula, decoded. The paper reports 86 % less time
than ControlNet with its DDIM-50 teacher.

- :func:`control_images`: ShapesWorld's object masks or edge maps as 3-channel control images in [0, 1] (the
  stock pipelines' control images are RGB; a canny map is grey repeated three times);
- :func:`load_or_train_controlnet`: the cached ControlNet of a profile (or a released one, ``paper`` profile);
- :class:`ControlledDenoiser`: U-Net + ControlNet + control image as one denoiser, so that the teacher's DDIM
  sampler and the one-step formula run unchanged (:func:`controlnet_sample`, :func:`controlnet_one_step`);
- :func:`controlnet_pipeline`: the same as a stock ``StableDiffusionControlNetPipeline`` around an exported student;
- :func:`object_mask` / :func:`mask_iou`: condition adherence, read by a fixed rule (see :func:`object_mask`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from ..artifacts import (
    TrainedModel,
    artifact_path,
    cached,
    load_checkpoint,
    load_or_train,
    module_digest,
    save_checkpoint,
    tensor_digest,
    training_allowed,
)
from ..backbones.backbone import sample_ddim
from ..backbones.denoisers import check_denoiser_matches
from ..diffusion import one_step_x0
from ..eval.samples import CachedSamples, one_step_key, samples_key
from ..optim import cosine_lr, set_lr
from ..profiles import ControlNetConfig, Profile
from ..world import ShapesDataset, make_split

CONDITIONS = ("mask", "edge")  # ShapesWorld's condition maps: filled object masks, their inner outlines
CONTROLNET_KIND = "controlnet"
SAMPLES_KIND = "controlnet_samples"
# The fields of ControlNetConfig that decide the trained weights (and so its artifact's key).
TRAINING_FIELDS = ("conditioning_embedding_out_channels", "steps", "batch_size", "lr", "warmup_steps",
                   "caption_dropout", "seed")


def control_images(dataset: ShapesDataset, condition: str, resolution: int | None = None) -> torch.Tensor:
    """The ``condition`` maps of ``dataset`` (built with ``make_split(..., with_maps=True)``) as control images:
    float (N, 3, H, W) in {0, 1}, the one-channel map repeated on R, G and B; nearest-upsampled to
    ``resolution`` when given (a 512-pixel backbone on the 32-pixel world)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    maps = dataset.masks if condition == "mask" else dataset.edges
    if maps is None:
        raise ValueError(f"split {dataset.name!r} was rendered without condition maps; "
                         "build it with make_split(name, world, with_maps=True)")
    maps = maps.float()
    if resolution is not None and resolution != maps.shape[-1]:
        maps = F.interpolate(maps, size=(resolution, resolution), mode="nearest")
    return maps.repeat(1, 3, 1, 1)


def check_control(control: torch.Tensor, backbone, batch: int) -> None:
    """Raise ``ValueError`` unless ``control`` is (batch, 3, H, W) at the backbone's image size, in [0, 1]."""
    expected = (batch, 3, backbone.resolution, backbone.resolution)
    if control.ndim != 4 or tuple(control.shape) != expected:
        raise ValueError(f"control images must have shape {expected} (one RGB map per prompt at the backbone's "
                         f"{backbone.resolution}-pixel size), got {tuple(control.shape)}")
    if control.min() < 0 or control.max() > 1:
        low, high = control.min().item(), control.max().item()
        raise ValueError(f"control images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]")


class ControlledDenoiser(nn.Module):
    """A U-Net driven by a ControlNet, callable wherever a U-Net is: ``forward(sample, timestep,
    encoder_hidden_states)`` adds the ControlNet's down and mid residuals (scaled by ``conditioning_scale``), as
    ``StableDiffusionControlNetPipeline`` does. A batch that is a multiple of the control images' (the two halves
    of classifier-free guidance) sees them repeated."""

    def __init__(self, unet: nn.Module, controlnet: ControlNetModel, control: torch.Tensor,
                 conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.control, self.conditioning_scale = control, conditioning_scale

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        repeats, rest = divmod(sample.shape[0], self.control.shape[0])
        if rest:
            raise ValueError(f"batch {sample.shape[0]} is not a multiple of the {self.control.shape[0]} "
                             "control images")
        control = self.control.to(sample.device, sample.dtype).repeat(repeats, 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=control, conditioning_scale=self.conditioning_scale,
                                    return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)


# --------------------------------------------------------------------------------------------------------------
# Training on the teacher
# --------------------------------------------------------------------------------------------------------------


def new_controlnet(unet: nn.Module, config: ControlNetConfig) -> ControlNetModel:
    """``ControlNetModel.from_unet(unet)`` (encoder copied, zero convolutions) with a conditioning embedding that
    brings image-size control maps to the latent size (one stride-2 stage per entry after the first)."""
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(config.conditioning_embedding_out_channels),
        conditioning_channels=3)


@torch.no_grad()
def training_latents(backbone, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """x0 of the ε-loss: the scaled VAE latents of ``images`` (uint8) or, in pixel space, the images in [−1, 1]."""
    pixels = images.float() / 127.5 - 1
    if backbone.vae is None:
        return pixels
    vae = backbone.vae
    return torch.cat([vae.encode(pixels[i : i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
                      for i in range(0, len(pixels), batch_size)]).float().cpu() * vae.config.scaling_factor


def train_controlnet(backbone, dataset: ShapesDataset, condition: str, config: ControlNetConfig,
                     progress: bool = True) -> tuple[ControlNetModel, dict[str, list[float]]]:
    """Train a ControlNet for ``condition`` on the frozen teacher ``backbone.denoiser`` with the ε-loss
    (t ~ U[0, T), ``config.caption_dropout`` of the prompts empty), AdamW at ``config.lr`` after a linear warm-up,
    gradient clipping at 1.0. Returns the ControlNet (eval mode, frozen) and its log."""
    torch.manual_seed(config.seed)
    controlnet = new_controlnet(backbone.denoiser, config).train()
    x0 = training_latents(backbone, dataset.images)
    control = control_images(dataset, condition, backbone.resolution)
    captions = sorted(set(dataset.captions))
    caption_index = torch.tensor(_index_of(captions, dataset.captions))
    states = torch.cat([backbone.encode_prompts(captions[i : i + 512]) for i in range(0, len(captions), 512)])
    null = backbone.null_embedding()
    scheduler = backbone.scheduler
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    log: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
    for step in tqdm(range(config.steps), desc=f"ControlNet ({condition})", mininterval=5.0, disable=not progress):
        lr = cosine_lr(step, config.steps, config.lr, config.lr, config.warmup_steps)  # constant after warm-up
        set_lr(optimizer, lr)
        batch = torch.randint(len(x0), (config.batch_size,), generator=generator)
        noise = torch.randn(x0[batch].shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        drop = torch.rand(len(batch), generator=generator) < config.caption_dropout
        cond = torch.where(drop[:, None, None], null.expand(len(batch), -1, -1), states[caption_index[batch]])
        denoiser = ControlledDenoiser(backbone.denoiser, controlnet, control[batch])
        pred = denoiser(scheduler.add_noise(x0[batch], noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ControlNet loss is {loss.item()} at step {step}; lower ControlNetConfig.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        for key, value in (("step", step), ("loss", loss.item()), ("lr", lr)):
            log[key].append(float(value))
    return controlnet.requires_grad_(False).eval(), log


def _index_of(vocabulary: list[str], items: list[str]) -> list[int]:
    position = {item: i for i, item in enumerate(vocabulary)}
    return [position[item] for item in items]


def load_or_train_controlnet(profile: Profile, backbone, condition: str, progress: bool = True) -> TrainedModel:
    """The ControlNet for ``condition`` of ``profile``: a released one where ``profile.controlnet.pretrained`` names
    it (``ControlNetModel.from_pretrained``, e.g. ``lllyasviel/sd-controlnet-canny`` for SD1.5), else loaded from
    ``data/`` when cached, else trained on the teacher with :func:`train_controlnet` on the training split.

    Raises:
        ValueError: unknown ``condition``.
        ArtifactError: not cached while ``WADI_NO_TRAIN=1``, or the cached file is damaged.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    config = profile.controlnet
    released = dict(config.pretrained).get(condition)
    if released is not None:
        model = ControlNetModel.from_pretrained(released).to(backbone.device).requires_grad_(False).eval()
        return TrainedModel(model=model, log=_empty_log(), trained=False, path=Path(released), config=config,
                            label=f"ControlNet ({condition}, released)")
    key = {"teacher": module_digest(backbone.denoiser), "world": profile.world, "condition": condition,
           "controlnet": {name: getattr(config, name) for name in TRAINING_FIELDS}}

    def build(metadata: dict[str, str]) -> ControlNetModel:
        return ControlNetModel.from_config(json.loads(metadata["model_config"])).requires_grad_(False).eval()

    def train() -> tuple[ControlNetModel, dict, dict[str, str]]:
        split = make_split("train", profile.world, with_maps=True)
        model, log = train_controlnet(backbone, split, condition, config, progress=progress)
        return model, log, {"model_config": json.dumps(dict(model.config)), "condition": condition}

    return load_or_train(CONTROLNET_KIND, key, build, train, config=config, label=f"ControlNet ({condition})")


def _empty_log() -> pd.DataFrame:
    return pd.DataFrame({"step": [], "loss": []})


# --------------------------------------------------------------------------------------------------------------
# Generation: the teacher (DDIM + CFG) and the one-step student under one ControlNet
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def controlnet_sample(backbone, controlnet: ControlNetModel, prompts: list[str], control: torch.Tensor,
                      num_inference_steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 128,
                      conditioning_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
    """The multi-step teacher under ``controlnet``: DDIM with CFG (the ControlNet on both halves, as the stock
    pipeline outside guess mode), z drawn from ``seed`` up front; images (B, 3, H, W) in [0, 1]."""
    check_control(control, backbone, len(prompts))
    noise, null = backbone.noise(len(prompts), seed), backbone.null_embedding()
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"ControlNet DDIM-{num_inference_steps}",
                      disable=not progress):
        part = slice(start, start + batch_size)
        denoiser = ControlledDenoiser(backbone.denoiser, controlnet, control[part], conditioning_scale)
        latents = sample_ddim(denoiser, backbone.scheduler, backbone.encode_prompts(prompts[part]), null,
                              num_inference_steps, guidance_scale, seed, batch_size, progress=False, noise=noise[part])
        out.append(backbone.decode(latents))
    return torch.cat(out)


def controlnet_samples_key(backbone, controlnet: ControlNetModel, prompts: list[str], control: torch.Tensor,
                           num_inference_steps: int, guidance_scale: float, seed: int, batch_size: int = 128) -> dict:
    """Everything that determines :func:`controlnet_sample`'s images: :func:`~wadi_core.eval.samples.samples_key`
    plus the ControlNet's weights and the control images."""
    return {**samples_key(backbone, prompts, num_inference_steps, guidance_scale, seed, batch_size),
            "sampler": "ddim-cfg-controlnet", "controlnet": module_digest(controlnet),
            "control": tensor_digest(control.float())}


def one_step_controlnet_key(student: nn.Module, backbone, controlnet: ControlNetModel, prompts: list[str],
                            control: torch.Tensor, seed: int, conditioning_scale: float = 1.0) -> dict:
    """Everything that determines :func:`controlnet_one_step`'s images (for records of their scores): the student's,
    text encoder's, VAE's and ControlNet's weights, the prompts, the control images, the seed and the scale."""
    key = {**one_step_key(backbone, prompts, seed), "student": module_digest(student),
           "sampler": "one-step-controlnet", "controlnet": module_digest(controlnet),
           "control": tensor_digest(control.float()), "conditioning_scale": float(conditioning_scale)}
    del key["teacher"]
    return key


def cached_controlnet_samples(backbone, controlnet: ControlNetModel, prompts: list[str], control: torch.Tensor,
                              num_inference_steps: int, guidance_scale: float, seed: int, batch_size: int = 128,
                              progress: bool = False) -> CachedSamples:
    """:func:`controlnet_sample`, cached as ``<data dir>/controlnet_samples-<hash>.safetensors`` keyed by
    everything :func:`wadi_core.eval.samples.samples_key` names plus the ControlNet's weights and the control
    images. Stored as uint8, the PNG values that FID reads (a quarter of float32's size); the loaded images are
    those values / 255.

    Raises:
        ArtifactError: not cached while ``WADI_NO_TRAIN=1``, or the cached file is damaged or from another key.
    """
    key = controlnet_samples_key(backbone, controlnet, prompts, control, num_inference_steps, guidance_scale, seed,
                                 batch_size)
    path = cached(SAMPLES_KIND, key)
    if path is not None:
        tensors, metadata = load_checkpoint(path, key)
        return CachedSamples(tensors["images"].float() / 255, sampled=False, path=path,
                             seconds=float(metadata["seconds"]))
    path = artifact_path(SAMPLES_KIND, key)
    training_allowed("teacher ControlNet samples", path)
    start = time.perf_counter()
    images = controlnet_sample(backbone, controlnet, prompts, control, num_inference_steps, guidance_scale, seed,
                               batch_size, progress=progress)
    seconds = time.perf_counter() - start
    pixels = (images * 255).round().to(torch.uint8)
    save_checkpoint(path, {"images": pixels}, key, seconds=repr(seconds), threads=str(torch.get_num_threads()))
    return CachedSamples(pixels.float() / 255, sampled=True, path=path, seconds=seconds)


def seconds_per_image(generate: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    """The median over ``repeats`` calls of ``generate`` (each returning a batch of images) of the call's wall time
    divided by its batch size; the median keeps one slow call (a first call's warm-up, a busy machine) out."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = generate()
        rates.append((time.perf_counter() - start) / len(images))
    return float(np.median(rates))


@torch.no_grad()
def controlnet_one_step(student: nn.Module, backbone, controlnet: ControlNetModel, prompts: list[str],
                        control: torch.Tensor, seed: int = 0, latents: torch.Tensor | None = None,
                        batch_size: int = 256, conditioning_scale: float = 1.0) -> torch.Tensor:
    """The one-step student under the teacher's ``controlnet``: ε̂ = student(z, T−1, c; ControlNet residuals),
    x0 = (z − σ_T ε̂)/α_T, decoded; z from ``seed`` (or ``latents``). Images (B, 3, H, W) in [0, 1]."""
    check_denoiser_matches(student, backbone)
    check_control(control, backbone, len(prompts))
    if latents is None:
        latents = backbone.noise(len(prompts), seed)
    backbone.check_latents(latents, len(prompts))
    out = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        denoiser = ControlledDenoiser(student, controlnet, control[part], conditioning_scale)
        x0 = one_step_x0(denoiser, latents[part], backbone.encode_prompts(prompts[part]), backbone.scheduler,
                         backbone.one_step_alpha_bar)
        out.append(backbone.decode(x0))
    return torch.cat(out)


def controlnet_pipeline(student_folder: str | Path, controlnet: ControlNetModel):
    """A stock ``StableDiffusionControlNetPipeline`` around an exported one-step student
    (:func:`wadi_core.distill.export_student`: its U-Net, text encoder, VAE and one-step ``LCMScheduler``)::

        pipe(prompts, image=control, num_inference_steps=1, guidance_scale=0.0, latents=z, output_type="pt")

    equals :func:`controlnet_one_step` on the same z."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(student_folder, safety_checker=None, requires_safety_checker=False)
    return StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                             unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


# --------------------------------------------------------------------------------------------------------------
# Condition adherence
# --------------------------------------------------------------------------------------------------------------


def object_mask(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Bool (B, H, W): the pixels of ``images`` (B, 3, H, W) in [0, 1] whose brightest channel exceeds
    ``threshold``. ShapesWorld draws saturated colours on black, so this fixed rule segments every object; it
    recovers the rendered masks of real images (notebook 05 measures how well)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return images.amax(dim=1) > threshold


def object_components(images: torch.Tensor, threshold: float = 0.25) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, ``(labels, sizes)``: the 8-connected components of :func:`object_mask` (``labels`` (H, W), 0 for
    the background, 1..n for the objects) and each component's pixel count (n,). Touching objects are one
    component, so this never over-counts a real scene."""
    components = []
    for mask in object_mask(images, threshold).cpu().numpy():
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        components.append((labels, np.bincount(labels.ravel())[1:]))
    return components


def mask_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union (B,) of two bool masks (B, H, W); 1 where both are empty."""
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(predicted.shape)} vs {tuple(target.shape)}")
    predicted, target = predicted.bool().flatten(1), target.bool().flatten(1)
    inter = (predicted & target).sum(1).float()
    union = (predicted | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
