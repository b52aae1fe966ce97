"""A denoiser alone, from wherever a teacher or a released student lives (WaDi Fig. 1's model pairs).

:func:`load_denoiser` takes a backbone name (``"tiny"``, ``"tiny-pixel"``, ``"sd15"``, ``"smoke-sd15"``, …), a
diffusers pipeline folder or hub repository (its ``unet`` / ``transformer``), a model folder or repository with a
``config.json``, or a ``.safetensors`` state dict such as the released merged WaDi U-Nets
(``rotated_unet-sdv1-5.safetensors``), which the official ``infer_sd_model.py`` loads with strict key matching into
a vanilla ``UNet2DConditionModel`` of the teacher's config, as this does (``like=teacher``).
:func:`check_denoiser_matches` tells a denoiser of another world (a pixel-space tiny student given to the latent
tiny SD) from one the backbone can run.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from safetensors.torch import load_file
from torch import nn

from .backbone import PipelineLoadError, _load_component, hub_json

DENOISER_FOLDERS = ("unet", "transformer")


def _model_class(config: dict, where: str) -> type:
    name = config.get("_class_name")
    name = {"Transformer2DModel": "PixArtTransformer2DModel"}.get(name, name)  # PixArt's legacy hub configs
    if name not in ("UNet2DConditionModel", "PixArtTransformer2DModel"):
        raise PipelineLoadError(f"{where}: config.json names {name!r}; expected a UNet2DConditionModel or a "
                                "PixArtTransformer2DModel")
    return getattr(diffusers, name)


def _from_pretrained(source: str, subfolder: str | None, config: dict) -> nn.Module:
    return _load_component(_model_class(config, f"{source}/{subfolder or ''}"), source, subfolder, None)


def load_denoiser(source: str | Path, like: nn.Module | None = None) -> nn.Module:
    """The frozen denoiser at ``source`` (see the module doc), in eval mode on the CPU.

    Args:
        source: backbone name, pipeline or model folder, hub repository id, or ``.safetensors`` state dict.
        like: the model whose class and config a ``.safetensors`` state dict is loaded into (strictly).

    Raises:
        ValueError: a state-dict file without ``like``.
        PipelineLoadError: nothing loadable at ``source``, a repository not cached while offline, or a state dict
            whose keys or shapes do not match ``like`` (the message names the first mismatches, and a pixel-space
            file given for a latent model says so).
    """
    from . import TINY_BACKBONES, TINY_PIXEL_BACKBONES, load_backbone
    from .paper import PAPER_BACKBONES
    from .smoke import SMOKE_KINDS, smoke_pipeline

    source = str(source)
    if source in TINY_BACKBONES or source in TINY_PIXEL_BACKBONES:
        return load_backbone(source).denoiser
    if source in PAPER_BACKBONES:
        spec = PAPER_BACKBONES[source]
        config = hub_json(spec.hub_id, f"{spec.subfolder}/config.json")
        return _frozen(_from_pretrained(spec.hub_id, spec.subfolder, config))
    if source.startswith("smoke-") and source[len("smoke-"):] in SMOKE_KINDS:
        return load_denoiser(smoke_pipeline(source[len("smoke-"):]))
    path = Path(source)
    if path.suffix == ".safetensors":
        return _strict_state_dict(path, like)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _frozen(_from_pretrained(source, None, json.loads((path / "config.json").read_text())))
        for folder in DENOISER_FOLDERS:
            if (path / folder / "config.json").is_file():
                config = json.loads((path / folder / "config.json").read_text())
                return _frozen(_from_pretrained(source, folder, config))
        raise PipelineLoadError(f"{path}: neither a model folder (config.json) nor a pipeline folder with a unet/ "
                                "or transformer/ subfolder")
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise PipelineLoadError(f"{source}: no denoiser there (expected a backbone name, a folder, a hub id "
                                "owner/name or a .safetensors file)")
    index = hub_json(source, "model_index.json", missing_ok=True)
    if index is not None:
        folder = next((f for f in DENOISER_FOLDERS if f in index), None)
        if folder is None:
            raise PipelineLoadError(f"{source}: its model_index.json has no unet or transformer")
        return _frozen(_from_pretrained(source, folder, hub_json(source, f"{folder}/config.json")))
    return _frozen(_from_pretrained(source, None, hub_json(source, "config.json")))


def _frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False).eval()


def _strict_state_dict(path: Path, like: nn.Module | None) -> nn.Module:
    if like is None:
        raise ValueError(f"{path} is a bare state dict: pass like=<the teacher> to load it into the teacher's class")
    if not path.is_file():
        raise PipelineLoadError(f"{path}: no such file")
    state = load_file(str(path))
    if "conv_in.weight" in state and hasattr(like.config, "in_channels"):
        _check_channels(int(state["conv_in.weight"].shape[1]), int(like.config.in_channels), path)
    model = type(like).from_config(like.config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise PipelineLoadError(f"{path} does not load strictly into a {type(like).__name__} of the teacher's config: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {reshaped[:3]}")
    model.load_state_dict(state, strict=True)
    return _frozen(model)


def _check_channels(channels: int, wanted: int, where: str | Path) -> None:
    """A denoiser of ``channels`` input channels where ``wanted`` are needed: a pixel-space model (3) given to a
    latent backbone (4) or the reverse, named as such."""
    if channels == wanted:
        return
    spaces = {3: "pixel-space", 4: "latent"}
    raise PipelineLoadError(
        f"{where} is a {spaces.get(channels, 'other')} ({channels}-channel) model but the backbone is "
        f"{spaces.get(wanted, 'other')} ({wanted}-channel): it was trained for another world (the tiny pixel world "
        "is 'tiny-pixel', the latent tiny SD 'tiny'). Retrain it for this backbone with `make reproduce` "
        "(students: `make reproduce ONLY=03`)"
    )


def check_denoiser_matches(denoiser: nn.Module, backbone) -> None:
    """Raise :class:`PipelineLoadError` unless ``denoiser`` takes the backbone's (C, H, W) =
    ``backbone.latent_shape`` and its text conditioning width: e.g. an exported pixel-space tiny student given as
    the denoiser of the latent tiny SD. The message names the file the denoiser was loaded from, when known."""
    config = denoiser.config
    where = getattr(config, "_name_or_path", None) or f"the {type(denoiser).__name__}"
    channels, height, _ = backbone.latent_shape
    _check_channels(int(config.in_channels), channels, where)
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    if int(size) != height:
        raise PipelineLoadError(f"{where} was built for {size}×{size} latents but backbone {backbone.name!r} works on "
                                f"{backbone.latent_shape} (Backbone.latent_shape); retrain it for this backbone with "
                                "`make reproduce` (students: `make reproduce ONLY=03`)")
    width = getattr(config, "cross_attention_dim", None)
    wanted = getattr(backbone.denoiser.config, "cross_attention_dim", None)
    if width != wanted:
        raise PipelineLoadError(f"{where} takes text states of width {width} but backbone {backbone.name!r}'s "
                                f"text encoder gives {wanted}; it belongs to another backbone")
