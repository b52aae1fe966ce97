"""The one :class:`Backbone` of both worlds: a diffusers pipeline's components plus what WaDi needs on top.

Every notebook, the distillation and the evaluation see only this object, whether it holds the tiny world's
latent tiny SD or pixel-space teacher, SD1.5 / SD2.1-base (``StableDiffusionPipeline``) or PixArt-α
(``PixArtAlphaPipeline``):

- components: ``tokenizer``, ``text_encoder``, ``denoiser`` (``UNet2DConditionModel`` or
  ``PixArtTransformer2DModel``), ``scheduler`` (a ``DDPMScheduler`` built from the pipeline's scheduler config,
  as the official ``train_dkd_sd.py`` / ``train_dkd_dit.py`` build their noise scheduler) and ``vae``
  (``AutoencoderKL``; None for a pixel-space denoiser);
- :meth:`~Backbone.encode_prompts`, :meth:`~Backbone.null_embedding`, :meth:`~Backbone.denoise`,
  :meth:`~Backbone.decode`, :meth:`~Backbone.one_step` and :meth:`~Backbone.sample` (the multi-step teacher:
  DDIM with classifier-free guidance);
- the recipe that goes with the architecture: student rank (256 for SD, 128 for PixArt), fake-score rank (32),
  the one-step ᾱ, and the layer rules of :func:`wadi_core.adapters.select_layers` (``adapted_layers``).

:func:`load_pipeline` reads a local diffusers pipeline folder (``model_index.json``) or a model-hub repository;
:func:`wadi_core.backbones.load_backbone` is the entry point by name.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from torch import nn
from tqdm import tqdm

from ..adapters import select_layers
from ..diffusion import is_transformer_denoiser, one_step_x0, pack_text_conditioning, predict_epsilon

# The pipeline layouts WaDi distils: the denoiser's component name and every component the backbone needs.
PIPELINE_LAYOUTS = {
    "StableDiffusionPipeline": ("unet", ("tokenizer", "text_encoder", "unet", "scheduler", "vae")),
    "PixArtAlphaPipeline": ("transformer", ("tokenizer", "text_encoder", "transformer", "scheduler", "vae")),
}
# What a local component folder must hold (one group of files at least), checked before loading: diffusers and
# transformers name the pipeline's root folder in their errors, and a tokenizer folder without its vocabulary
# loads as an empty tokenizer without any error. Models need config.json and a weights file.
COMPONENT_FILES = {
    "tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",)),
    "scheduler": (("scheduler_config.json",),),
}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
PIXART_MAX_LENGTH = 120  # T5 tokens per prompt in PixArtAlphaPipeline and the official train_dkd_dit.py
OFFICIAL_ONE_STEP_ALPHA_BAR = 0.0047  # hard-coded in train_dkd_dit.py and infer_pixart.py (and the SD scripts)


@dataclass
class Backbone:
    """Frozen text encoder + tokenizer, frozen denoiser, DDPM scheduler and (latent models) VAE."""

    name: str  # "tiny", "tiny-pixel", "sd15", …, or the folder it was loaded from
    tokenizer: Any
    text_encoder: nn.Module
    denoiser: nn.Module
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None  # None: the denoiser works in pixel space
    pipeline_class: str | None = None  # the diffusers pipeline it was loaded from (None: the tiny pixel world)
    max_length: int = 77  # tokens per prompt (padding="max_length")
    student_rank: int = 256  # the official student LoRaD rank: 256 (SD), 128 (PixArt)
    fake_rank: int = 32  # the official fake-score rank, every backbone
    one_step_alpha_bar: float | None = None  # None: the scheduler's ᾱ_{T−1}; PixArt: the official 0.0047
    clip: nn.Module | None = None  # the tiny world's CLIP (text + vision), for its CLIP score

    @property
    def is_transformer(self) -> bool:
        """True for a PixArt transformer (T5 with attention mask, learned sigma), False for a U-Net."""
        return is_transformer_denoiser(self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of z and of the one-step x0: the VAE latent (SD, PixArt) or the image (pixel world)."""
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.denoiser.config.in_channels), int(height), int(width)

    def check_latents(self, latents: torch.Tensor, batch: int | None = None) -> None:
        """Raise ``ValueError`` unless ``latents`` is (B, C, H, W) with (C, H, W) = :attr:`latent_shape` (and
        B = ``batch`` when given): the sizes the denoiser was trained for. A shape comparison only."""
        shape = tuple(latents.shape)
        if shape[1:] != self.latent_shape or (batch is not None and shape[0] != batch):
            expected = (batch if batch is not None else "B", *self.latent_shape)
            space = "pixels" if self.vae is None else "VAE latents"
            raise ValueError(f"latents must have shape {expected} ({space}: (C, H, W) = Backbone.latent_shape "
                             f"{self.latent_shape} of backbone {self.name!r}), got {shape}; draw them with "
                             "backbone.noise(batch, seed)")

    @property
    def resolution(self) -> int:
        """Image side in pixels: latent side × the VAE's downsampling factor."""
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.latent_shape[1] * factor

    def adapted_layers(self, rule: str = "student") -> list[str]:
        """The Linears the student (``"student"``) or fake score (``"fake"``) adapts: the official
        ``register_hooks`` / ``register_hooks_teacher`` for this architecture."""
        return select_layers(self.denoiser, rule)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Per-token conditioning (B, L, D): CLIP's last hidden states, as SD's pipeline computes them (no mask).
        For T5 (PixArt): (B, L, D + 1), the states with the attention mask packed as the last feature
        (:func:`wadi_core.diffusion.pack_text_conditioning`), prompts lower-cased and stripped as
        ``PixArtAlphaPipeline`` does without caption cleaning."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        device = self.device
        if self.is_transformer:
            prompts = [p.lower().strip() for p in prompts]
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        if not self.is_transformer:
            return self.text_encoder(input_ids=tokens.input_ids.to(device)).last_hidden_state
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return pack_text_conditioning(states, mask)

    def null_embedding(self) -> torch.Tensor:
        """Conditioning of the empty prompt (1, L, D): the unconditional branch of CFG."""
        return self.encode_prompts([""])

    def denoise(self, latents: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor,
                denoiser: nn.Module | None = None) -> torch.Tensor:
        """ε̂ of ``denoiser`` (default: the frozen teacher) at (latents, t, cond); PixArt's sigma half dropped."""
        self.check_latents(latents)
        return predict_epsilon(self.denoiser if denoiser is None else denoiser, latents, t, cond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W): VAE decode of ``latents / scaling_factor`` then (x/2 + 1/2) clamped,
        exactly as the stock pipelines' ``output_type="pt"``; a pixel-space x0 is clamped to [−1, 1] and mapped."""
        self.check_latents(latents)
        if self.vae is None:
            return (latents.clamp(-1, 1) + 1) / 2
        latents = latents.to(device=next(self.vae.parameters()).device, dtype=self.vae.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def noise(self, batch: int, seed: int) -> torch.Tensor:
        """z ~ N(0, I) of shape (batch, C, H, W), drawn on the CPU from ``seed`` (device-independent)."""
        z = torch.randn(batch, *self.latent_shape, generator=torch.Generator().manual_seed(seed))
        return z.to(device=self.device, dtype=self.dtype)

    def _initial_noise(self, batch: int, seed: int, latents: torch.Tensor | None) -> torch.Tensor:
        """z from ``seed``, or the given ``latents`` checked against :attr:`latent_shape`."""
        if latents is None:
            return self.noise(batch, seed)
        self.check_latents(latents, batch)
        return latents.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def one_step(self, prompts: list[str], seed: int = 0, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's own one-step image (a VSD student at init), decoded, in [0, 1] (B, 3, H, W).

        x0 = (z − σ_T ε̂)/α_T on z from ``seed`` or given as ``latents`` (:func:`wadi_core.diffusion.one_step_x0`):
        every ε̂ error is amplified by 1/α_T (14.6 with SD1.5's schedule).
        """
        x0 = one_step_x0(self.denoiser, self._initial_noise(len(prompts), seed, latents),
                         self.encode_prompts(prompts), self.scheduler, self.one_step_alpha_bar)
        return self.decode(x0)

    def sample(self, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int = 0,
               batch_size: int = 128, progress: bool = True, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The multi-step teacher: N-step DDIM (η = 0) with classifier-free guidance from z drawn from ``seed``
        (or given as ``latents``), decoded, in [0, 1]."""
        noise = None if latents is None else self._initial_noise(len(prompts), seed, latents)
        latents = sample_ddim(self.denoiser, self.scheduler, self.encode_prompts(prompts), self.null_embedding(),
                              num_inference_steps, guidance_scale, seed, batch_size, progress, noise=noise)
        return torch.cat([self.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)])


@torch.no_grad()
def sample_ddim(
    denoiser: nn.Module,
    scheduler: DDPMScheduler,
    cond: torch.Tensor,
    null: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int = 128,
    progress: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM with CFG, ε̂ = ε̂(∅) + g·(ε̂(c) − ε̂(∅)); returns the final latents (B, C, H, W), not decoded.

    All initial noise is drawn up front from ``seed`` on the CPU (or given as ``noise``), so the result does not
    depend on ``batch_size``.
    """
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    parameter = next(denoiser.parameters())
    if noise is None:
        size = denoiser.config.sample_size
        shape = (len(cond), denoiser.config.in_channels, size, size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(parameter.device, parameter.dtype)
    guided = guidance_scale != 1.0
    out = []
    for start in tqdm(range(0, len(cond), batch_size), desc=f"DDIM-{num_inference_steps} CFG {guidance_scale}",
                      disable=not progress):
        states = cond[start : start + batch_size]
        x = noise[start : start + batch_size]
        both = torch.cat([null.expand_as(states), states]) if guided else states
        for t in ddim.timesteps:
            eps = predict_epsilon(denoiser, torch.cat([x, x]) if guided else x, t, both)
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            x = ddim.step(eps, t, x).prev_sample
        out.append(x)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------
# Loading a diffusers pipeline folder or hub repository
# --------------------------------------------------------------------------------------------------------------


class PipelineLoadError(RuntimeError):
    """A pipeline folder or hub repository that cannot be loaded as a WaDi backbone; the message says why."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _read_model_index(source: str | Path) -> dict:
    folder = Path(source)
    if folder.is_dir():
        path = folder / "model_index.json"
        if not path.is_file():
            raise PipelineLoadError(f"{folder} has no model_index.json: not a diffusers pipeline folder "
                                    "(save one with pipeline.save_pretrained(folder))")
        return json.loads(path.read_text())
    return hub_json(str(source), "model_index.json")


def hub_json(repo_id: str, filename: str, missing_ok: bool = False) -> dict | None:
    """A JSON file of a hub repository (the local cache only when ``HF_HUB_OFFLINE=1``); None for a file the
    repository does not have when ``missing_ok``.

    Raises:
        PipelineLoadError: the repository is not cached while offline, unreachable, or unknown.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline())).read_text())
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: not cached, not "not there"
        raise PipelineLoadError(_hub_error(repo_id, err)) from err
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise PipelineLoadError(f"{repo_id} has no {filename}") from None
    except Exception as err:  # huggingface_hub raises OSError subclasses and its own errors
        raise PipelineLoadError(_hub_error(repo_id, err)) from err


def _hub_error(repo_id: str, err: Exception) -> str:
    where = "is not in the local model-hub cache and HF_HUB_OFFLINE=1 forbids downloading it" if hub_offline() \
        else "could not be downloaded"
    return (f"{repo_id} {where} ({type(err).__name__}: {err}). Download it on a machine with network "
            f"(huggingface-cli download {repo_id}) or pass a local pipeline folder to load_backbone.")


def _component_class(model_index: dict, name: str, source: str | Path) -> type:
    entry = model_index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise PipelineLoadError(f"{source}: model_index.json names no {name!r} component; a "
                                f"{model_index.get('_class_name')} needs {name}")
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name)


def _missing_files(source: Path, name: str | None, cls: type) -> str | None:
    """What the local component folder ``source/name`` (``name`` None: ``source`` itself) lacks, or None."""
    folder = source if name is None else source / name
    if not folder.is_dir():
        return f"the {name!r} component's folder {folder} is missing"
    if issubclass(cls, nn.Module):
        if not (folder / "config.json").is_file():
            return f"{folder / 'config.json'} is missing"
        if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            return f"{folder} holds no weights file ({' or '.join(WEIGHT_PATTERNS)})"
        return None
    groups = COMPONENT_FILES.get(name or "", ())
    if groups and not any(all((folder / file).is_file() for file in group) for group in groups):
        wanted = " or ".join(" + ".join(group) for group in groups)
        return f"{folder} lacks its files ({wanted})"
    return None


def _load_component(cls: type, source: str | Path, name: str | None, dtype: torch.dtype | None) -> Any:
    """``cls.from_pretrained(source, subfolder=name)`` (``name`` None: the model at ``source`` itself), offline
    when ``HF_HUB_OFFLINE=1``; every failure a :class:`PipelineLoadError` naming the component."""
    kwargs: dict[str, Any] = {"subfolder": name}
    if not Path(source).is_dir():
        kwargs["local_files_only"] = hub_offline()
    if dtype is not None and issubclass(cls, nn.Module):
        kwargs["dtype"] = dtype
    missing = _missing_files(Path(source), name, cls) if Path(source).is_dir() else None
    if missing is not None:
        raise PipelineLoadError(f"{source}: {missing}. The folder is incomplete: copy it again, or save it again "
                                "with pipeline.save_pretrained(folder)")
    try:
        return cls.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        if not Path(source).is_dir():
            raise PipelineLoadError(_hub_error(str(source), err)) from err
        raise PipelineLoadError(f"{source}: cannot load the {name!r} component as {cls.__name__} "
                                f"({type(err).__name__}: {err})") from err


def _ddpm_scheduler(source: str | Path) -> DDPMScheduler:
    """The pipeline's scheduler config as a ``DDPMScheduler`` (``train_dkd_*.py`` build their noise scheduler
    the same way). PixArt ships a DPM-Solver config without ``clip_sample``; DDPM and DDIM would default to
    clipping x0, which neither PixArt's sampler nor the one-step formula does, so a missing value means False."""
    scheduler_config = _load_component(_SchedulerConfig, source, "scheduler", None)
    return DDPMScheduler.from_config({"clip_sample": False, **scheduler_config})


class _SchedulerConfig:
    """``from_pretrained`` returning a scheduler folder's raw config (no defaults filled in)."""

    @staticmethod
    def from_pretrained(source: str, subfolder: str, **kwargs) -> dict:
        return DDPMScheduler.load_config(source, subfolder=subfolder, **kwargs)


def _check_components(source: str | Path, tokenizer, text_encoder, denoiser, vae, scheduler, transformer: bool):
    """Mismatches that would fail deep inside a forward pass, reported with the component that is wrong."""
    text_width = text_encoder.config.d_model if transformer else text_encoder.config.hidden_size
    wanted = denoiser.config.caption_channels if transformer else denoiser.config.cross_attention_dim
    if text_width != wanted:
        raise PipelineLoadError(f"{source}: text_encoder width {text_width} does not match the denoiser's "
                                f"{'caption_channels' if transformer else 'cross_attention_dim'} {wanted}")
    if vae.config.latent_channels != denoiser.config.in_channels:
        raise PipelineLoadError(f"{source}: vae latent_channels {vae.config.latent_channels} ≠ the denoiser's "
                                f"in_channels {denoiser.config.in_channels}")
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise PipelineLoadError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the text encoder's "
                                f"vocabulary has {text_encoder.config.vocab_size}")
    if scheduler.config.prediction_type != "epsilon":
        raise PipelineLoadError(f"{source}: scheduler prediction_type {scheduler.config.prediction_type!r}; WaDi's "
                                "one-step formula and VSD losses need an ε-prediction model")


def load_pipeline(
    source: str | Path,
    *,
    name: str | None = None,
    denoiser_source: tuple[str, str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """A :class:`Backbone` from a ``StableDiffusionPipeline`` or ``PixArtAlphaPipeline`` folder or hub repository.

    Args:
        source: a local pipeline folder (``model_index.json``) or a hub repository id (read from the local cache
            when ``HF_HUB_OFFLINE=1``).
        name: the backbone's name (default: ``str(source)``).
        denoiser_source: (repository or folder, subfolder) of the denoiser when it lives elsewhere (PixArt-α 256
            ships only its transformer; the other components are those of the 512 px pipeline).
        device: where to put the models (default: CUDA when available, else CPU).
        dtype: weight dtype of denoiser, text encoder and VAE (default: as saved).

    Raises:
        PipelineLoadError: not a pipeline folder, an unsupported pipeline class, a missing component, mismatched
            components, a hub repository that is not cached while offline, or CUDA requested without a GPU; the
            message names the thing.
    """
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise PipelineLoadError(f"{source}: device {str(device)!r} requested but CUDA is not available; "
                                "load on the CPU (device='cpu') or run on a GPU machine")
    model_index = _read_model_index(source)
    pipeline_class = model_index.get("_class_name")
    if pipeline_class not in PIPELINE_LAYOUTS:
        raise PipelineLoadError(f"{source}: pipeline class {pipeline_class!r} is not supported; WaDi distils "
                                f"{' or '.join(PIPELINE_LAYOUTS)} (see model_index.json)")
    denoiser_name, needed = PIPELINE_LAYOUTS[pipeline_class]
    classes = {part: _component_class(model_index, part, source) for part in needed}
    transformer = denoiser_name == "transformer"
    tokenizer = _load_component(classes["tokenizer"], source, "tokenizer", None)
    text_encoder = _load_component(classes["text_encoder"], source, "text_encoder", dtype)
    denoiser_from, denoiser_folder = denoiser_source or (source, denoiser_name)
    denoiser = _load_component(classes[denoiser_name], denoiser_from, denoiser_folder, dtype)
    vae = _load_component(classes["vae"], source, "vae", dtype)
    scheduler = _ddpm_scheduler(source)
    _check_components(source, tokenizer, text_encoder, denoiser, vae, scheduler, transformer)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for model in (text_encoder, denoiser, vae):
        model.requires_grad_(False).eval().to(device)
    return Backbone(
        name=str(source) if name is None else name,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        denoiser=denoiser,
        scheduler=scheduler,
        vae=vae,
        pipeline_class=pipeline_class,
        max_length=PIXART_MAX_LENGTH if transformer else int(tokenizer.model_max_length),
        student_rank=128 if transformer else 256,
        fake_rank=32,
        one_step_alpha_bar=OFFICIAL_ONE_STEP_ALPHA_BAR if transformer else None,
    )
