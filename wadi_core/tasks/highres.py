"""High-resolution synthesis with a one-step student and re-dilated convolutions (ScaleCrafter's idea; WaDi's
downstream section, notebook 05 §2).

A U-Net run on latents larger than it was trained on repeats objects: its receptive field covers a smaller part
of the canvas. ScaleCrafter (He et al., ICLR 2024) dilates the 3×3 convolutions of the deepest blocks by the scale
factor while the early, high-noise steps run (its ``dilate_settings`` files, one ``name:dilation`` line per
convolution; the SD1.5 1024² file dilates ``down_blocks.3``, ``mid_block`` and ``up_blocks.0`` by 2). A one-step
student's only step is at t = T−1, the noisiest: there the whole trajectory is dilated.

- :func:`redilation_settings` expands ``{block: dilation}`` (``"lowest"``: the lowest-resolution level) into the
  per-convolution settings ScaleCrafter's files list; :func:`read_dilation_settings` reads such a file;
- :func:`redilated` applies settings to a U-Net for the duration of a ``with`` block (stock pipelines included);
- :func:`one_step_at_size` generates at any size that the U-Net's levels divide;
- :func:`count_objects` / :func:`repetition_rate`: the documented connected-component rule behind "object
  repetition".
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import module_digest
from ..backbones.denoisers import check_denoiser_matches
from ..diffusion import one_step_x0
from ..eval.attributes import parse_prompt
from ..eval.samples import one_step_key
from .controlnet import object_components

LOWEST = "lowest"  # the U-Net's lowest-resolution level: its last down block, the mid block, its first up block
# The convolutions ScaleCrafter dilates inside a block: the resnets' two 3×3 convs and the upsampler's conv.
_DILATED_CONV = re.compile(r"\.(resnets\.\d+\.conv[12]|upsamplers\.\d+\.conv)$")


def lowest_level_blocks(unet: nn.Module) -> list[str]:
    """``[down_blocks.<last>, mid_block, up_blocks.0]``: SD1.5's ``down_blocks.3 / mid_block / up_blocks.0``."""
    return [f"down_blocks.{len(unet.down_blocks) - 1}", "mid_block", "up_blocks.0"]


def _check_dilation(name: str, dilation) -> int:
    if isinstance(dilation, bool) or not isinstance(dilation, (int, np.integer)) or dilation < 1:
        raise ValueError(f"dilation of {name!r} must be an integer ≥ 1, got {dilation!r}")
    return int(dilation)


def redilation_settings(unet: nn.Module, blocks: Sequence[tuple[str, int]]) -> dict[str, int]:
    """``{convolution name: dilation}`` for every resnet / upsampler 3×3 convolution inside the named blocks
    (``(("down_blocks.2", 2), ("mid_block", 2))``, or ``(("lowest", 2),)`` for :func:`lowest_level_blocks`), in
    the form of ScaleCrafter's ``dilate_settings`` files.

    Raises:
        ValueError: a block the U-Net does not have, or a dilation that is not an integer ≥ 1.
    """
    modules = dict(unet.named_modules())
    settings: dict[str, int] = {}
    for block, dilation in blocks:
        dilation = _check_dilation(block, dilation)
        names = lowest_level_blocks(unet) if block == LOWEST else [block]
        for name in names:
            if name not in modules or name == "":
                tops = sorted({n.split(".")[0] for n in modules if n})
                raise ValueError(f"the U-Net has no block {name!r} to re-dilate; blocks are indexed under "
                                 f"{', '.join(tops)} (or name {LOWEST!r} for the lowest-resolution level)")
            for conv_name, module in modules.items():
                if conv_name.startswith(f"{name}.") and _DILATED_CONV.search(conv_name) and _is_3x3(module):
                    settings[conv_name] = dilation
    return settings


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3) and tuple(module.stride) == (1, 1)


def read_dilation_settings(path: str | Path) -> dict[str, int]:
    """A ScaleCrafter ``dilate_settings`` file (``down_blocks.3.resnets.0.conv1:2`` per line) as a dict."""
    settings = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.strip().rpartition(":")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"{path}:{number}: expected 'module.name:dilation', got {line!r}")
        settings[name] = _check_dilation(name, int(value))
    return settings


@contextmanager
def redilated(unet: nn.Module, settings: dict[str, int]) -> Iterator[nn.Module]:
    """Within the block, each named 3×3 convolution of ``unet`` has dilation d and padding d (so the output keeps
    its size and the kernel covers a d-times larger window with the same weights); restored on exit.

    Raises:
        ValueError: a name that is not a stride-1 3×3 ``nn.Conv2d`` of ``unet``, or a bad dilation.
    """
    modules = dict(unet.named_modules())
    for name, dilation in settings.items():
        _check_dilation(name, dilation)
        if name not in modules or not _is_3x3(modules[name]):
            raise ValueError(f"cannot re-dilate {name!r}: not a stride-1 3×3 Conv2d of the U-Net "
                             "(see redilation_settings for the names)")
    saved = {name: (modules[name].dilation, modules[name].padding) for name in settings}
    try:
        for name, dilation in settings.items():
            modules[name].dilation, modules[name].padding = (dilation, dilation), (dilation, dilation)
        yield unet
    finally:
        for name, (dilation, padding) in saved.items():
            modules[name].dilation, modules[name].padding = dilation, padding


def latent_size(backbone, height: int, width: int) -> tuple[int, int]:
    """The latent (h, w) of an image of ``height`` × ``width`` pixels; raises ``ValueError`` unless the VAE's and
    the U-Net's downsamplings divide it."""
    vae_factor = backbone.resolution // backbone.latent_shape[1]
    levels = 2 ** (len(backbone.denoiser.config.block_out_channels) - 1)
    for side, value in (("height", height), ("width", width)):
        if value % (vae_factor * levels):
            raise ValueError(f"image {side} {value} must be a multiple of {vae_factor * levels} (VAE ×{vae_factor}, "
                             f"U-Net levels ×{levels})")
    return height // vae_factor, width // vae_factor


def image_size(backbone, scale: tuple[float, float]) -> tuple[int, int]:
    """Pixels (height, width) of ``scale`` = (height, width) in training sides; raises below 1."""
    if any(s < 1 for s in scale):
        raise ValueError(f"scale factors must be ≥ 1 (sizes above the training size), got {tuple(scale)}")
    return tuple(int(round(s * backbone.resolution)) for s in scale)


def one_step_at_size_key(student: nn.Module, backbone, prompts: list[str], height: int, width: int, seed: int,
                         settings: dict[str, int] | None = None) -> dict:
    """Everything that determines :func:`one_step_at_size`'s images (for records of their scores): the student's,
    text encoder's and VAE's weights, the prompts, the size, the seed and the re-dilation."""
    key = {**one_step_key(backbone, prompts, seed), "student": module_digest(student), "sampler": "one-step-at-size",
           "height": int(height), "width": int(width), "redilation": dict(sorted((settings or {}).items()))}
    del key["teacher"], key["image_size"]
    return key


@torch.no_grad()
def one_step_at_size(student: nn.Module, backbone, prompts: list[str], height: int, width: int, seed: int = 0,
                     settings: dict[str, int] | None = None, batch_size: int = 128) -> torch.Tensor:
    """The one-step student's images (B, 3, height, width) in [0, 1] from z of the matching latent size drawn from
    ``seed``, naively (``settings`` None) or with its convolutions re-dilated by ``settings``
    (:func:`redilation_settings`) during the step."""
    check_denoiser_matches(student, backbone)
    h, w = latent_size(backbone, height, width)
    channels = backbone.latent_shape[0]
    z = torch.randn(len(prompts), channels, h, w, generator=torch.Generator().manual_seed(seed))
    parameter = next(student.parameters())
    z = z.to(parameter.device, parameter.dtype)
    out = []
    with redilated(student, settings or {}):
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            x0 = one_step_x0(student, z[part], backbone.encode_prompts(prompts[part]), backbone.scheduler,
                             backbone.one_step_alpha_bar)
            out.append(_decode_any_size(backbone, x0))
    return torch.cat(out)


def _decode_any_size(backbone, latents: torch.Tensor) -> torch.Tensor:
    """:meth:`Backbone.decode` without its training-size check (the VAE is fully convolutional)."""
    if backbone.vae is None:
        return (latents.clamp(-1, 1) + 1) / 2
    vae = backbone.vae
    image = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def to_training_size(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Area-downsample (B, 3, H, W) to ``resolution``² (a wide image is squeezed horizontally)."""
    return F.interpolate(images, size=(resolution, resolution), mode="area")


def count_objects(images: torch.Tensor, threshold: float = 0.25, min_pixels: int = 3) -> np.ndarray:
    """Objects per image (B,) by a fixed rule: the pixels whose brightest channel exceeds ``threshold``
    (ShapesWorld's saturated colours on black), grouped into 8-connected components, those of at least
    ``min_pixels`` pixels counted. Touching objects count once, so the rule never over-counts a real scene."""
    return np.array([int((sizes >= min_pixels).sum()) for _, sizes in object_components(images, threshold)])


def named_objects(prompts: list[str]) -> np.ndarray:
    """Objects each ShapesWorld prompt names (1 or 2)."""
    return np.array([len(parse_prompt(p).objects) for p in prompts])


def repetition_rate(images: torch.Tensor, prompts: list[str], threshold: float = 0.25, min_pixels: int = 3) -> float:
    """Share of images with more objects (:func:`count_objects`) than their prompt names: ScaleCrafter's object
    repetition, read by rule instead of by eye."""
    return float((count_objects(images, threshold, min_pixels) > named_objects(prompts)).mean())
