"""Which layers get an adapter, and the model-level operations on them (WaDi §3.2–§3.3).

Layer selection (the official ``train_dkd_sd.py`` / ``train_dkd_dit.py``, ``register_hooks`` for the student and
``register_hooks_teacher`` for the fake score):

- SD U-Net (has ``down_blocks``): ``rule="student"`` adapts every ``nn.Linear`` under ``down_blocks`` /
  ``mid_block`` / ``up_blocks``; ``rule="fake"`` the same minus names containing ``proj_in``, ``proj_out``,
  ``time_emb_proj``.
- PixArt transformer: ``rule="student"`` adapts every ``nn.Linear`` of the model (``adaln_single``,
  ``caption_projection``, ``proj_out`` included); ``rule="fake"`` only Linears inside ``transformer_blocks``,
  with the same skip list.

``exclude`` drops further layers by name substring: ``exclude=("adaln_single",)`` on PixArt-α gives the paper's
81.22M trainable parameters (Table 1) instead of the code's 82.56M.

Typical use::

    names = inject(unet, "lorad", rank=256)            # student, in place; everything else frozen
    ...train...
    save_adapters(unet, "student.safetensors")          # adapter tensors + {method, rank, rule, alpha}
    merge(unet)                                         # plain nn.Linear again: unet.state_dict() is vanilla
    vanilla = merged_copy(unet)                         # or: a merged deep copy, the adapted model untouched

``merge(model, remove=False)`` keeps the adapter modules (merged, running the plain Linear) so that
:func:`unmerge` can undo it; :func:`remove` drops the adapters and restores the original weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import atomic_path
from .dora import DoRALinear
from .lora import LoRALinear
from .lorad import LoRaDLinear

METHODS = ("lorad", "lora", "dora", "dora_frozen_norm", "full")
RULES = ("student", "fake")
UNET_BLOCK_PREFIXES = ("down_blocks", "mid_block", "up_blocks")  # the SD student rule (``register_hooks``)
FAKE_SKIP = ("proj_in", "proj_out", "time_emb_proj")  # the fake-score rule skips these (``register_hooks_teacher``)
ADAPTER_TYPES = (LoRaDLinear, LoRALinear, DoRALinear)
_CONFIG_ATTR = "_wadi_adapter_config"
_FORMAT = "wadi-adapters"


@dataclass(frozen=True)
class AdapterConfig:
    """How :func:`inject` adapted a model; stored on the model and in the metadata of :func:`save_adapters`."""

    method: str  # one of METHODS; "full" = every parameter trainable, no adapter modules (SwiftBrush/FT)
    rank: int  # r; official code: student 256 (SD) / 128 (PixArt), fake score 32; unused by "full"
    rule: str = "student"  # one of RULES
    alpha: float | None = None  # LoRA/DoRA α (scale α/r); None means α = r; must be None for "lorad" and "full"
    exclude: tuple[str, ...] = ()  # extra name substrings to leave unadapted, e.g. ("adaln_single",)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown layer rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.method != "full" and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive int for method {self.method!r}, got {self.rank!r}")
        if self.alpha is not None and self.method in ("lorad", "full"):
            raise ValueError(f"alpha only applies to lora/dora/dora_frozen_norm, not to method {self.method!r}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))  # 4 and 4.0 are the same adapter
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        object.__setattr__(self, "exclude", exclude)


def _model_kind(model: nn.Module) -> str:
    if hasattr(model, "down_blocks"):
        return "unet"
    if "Transformer" in type(model).__name__ and hasattr(model, "transformer_blocks"):
        return "pixart"
    raise ValueError(
        f"cannot pick adapter layers for a {type(model).__name__}: supported are UNet2DConditionModel-like models "
        "(with down_blocks) and PixArt transformers (with transformer_blocks)"
    )


def select_layers(model: nn.Module, rule: str = "student", exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``rule`` adapts (the official ``register_hooks``), sorted."""
    if rule not in RULES:
        raise ValueError(f"unknown layer rule {rule!r}; choose one of {', '.join(RULES)}")
    kind = _model_kind(model)
    if kind == "unet":
        prefixes = tuple(f"{p}." for p in UNET_BLOCK_PREFIXES)
    else:  # PixArt: the student adapts the whole transformer, the fake score only its blocks
        prefixes = ("",) if rule == "student" else ("transformer_blocks.",)
    skip = tuple(exclude) + (FAKE_SKIP if rule == "fake" else ())
    return sorted(
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefixes) and not any(s in name for s in skip)
    )


def _make_adapter(linear: nn.Linear, name: str, config: AdapterConfig) -> nn.Module:
    if config.method == "lorad":
        return LoRaDLinear(linear, config.rank, name=name)
    if config.method == "lora":
        return LoRALinear(linear, config.rank, alpha=config.alpha)
    return DoRALinear(linear, config.rank, alpha=config.alpha, frozen_norm=config.method == "dora_frozen_norm")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The injected adapter modules by name (relative to ``model``), sorted."""
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)))


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The :class:`AdapterConfig` :func:`inject` stored on ``model``; None when it has no adapters."""
    return getattr(model, _CONFIG_ATTR, None)


def inject(model: nn.Module, method: str, rank: int, rule: str = "student", alpha: float | None = None,
           exclude: tuple[str, ...] = ()) -> list[str]:
    """Add adapters to ``model`` in place and freeze everything else (WaDi §3.2; ``register_hooks``).

    Each selected ``nn.Linear`` is replaced by a :class:`LoRaDLinear` (``"lorad"``), :class:`LoRALinear`
    (``"lora"``) or :class:`DoRALinear` (``"dora"``, ``"dora_frozen_norm"``) wrapping it, with adapter tensors on
    the layer's device (``meta`` works, for parameter counting). ``"full"`` adds no module and makes every
    parameter of ``model`` trainable (full fine-tuning, SwiftBrush).

    Args:
        model: a diffusers ``UNet2DConditionModel``-like U-Net or a PixArt transformer.
        method: one of ``METHODS``.
        rank: r (ignored by ``"full"``).
        rule: ``"student"`` or ``"fake"`` (the fake score's layer set).
        alpha: LoRA/DoRA α (scale α/r); None means α = r.
        exclude: extra name substrings to leave unadapted (``("adaln_single",)``: the paper's PixArt count).

    Returns:
        The adapted module names, sorted; ``[]`` for ``"full"`` (no module is adapted).

    Raises:
        ValueError: unknown method/rule, bad rank/alpha, unsupported model, a model that already has adapters,
            or (LoRaD) a selected layer with odd ``in_features`` — the error names the layer.
    """
    config = AdapterConfig(method, rank, rule, alpha, tuple(exclude))
    if adapter_config(model) is not None or adapter_modules(model):
        raise ValueError("model already has adapters; call remove(model) or merge(model) before injecting again")
    if method == "full":
        model.requires_grad_(True)
        setattr(model, _CONFIG_ATTR, config)
        return []
    names = select_layers(model, rule, config.exclude)
    adapters = {name: _make_adapter(model.get_submodule(name), name, config) for name in names}  # validate all first
    model.requires_grad_(False)
    for name, adapter in adapters.items():
        _replace(model, name, adapter)
    setattr(model, _CONFIG_ATTR, config)
    return names


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (the "trainable params" of WaDi's Table 1)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module, remove: bool = True, safe_merge: bool = False) -> list[str]:
    """Write every adapter into its base weight (merged inference costs nothing extra; the official
    ``infer_sd_model.py`` loads such a merged ``rotated_unet`` state dict).

    Args:
        model: a model after :func:`inject`.
        remove: replace each adapter by its plain ``nn.Linear`` (now holding the merged weight), so that
            ``model.state_dict()`` loads ``strict=True`` into a vanilla model of the same config (the released
            ``rotated_unet-*.safetensors`` format). With ``remove=False`` the adapters stay, merged, and
            :func:`unmerge` can undo the merge.
        safe_merge: check each merged weight for non-finite values (ValueError naming the layer).

    Returns:
        The merged module names (``[]`` for ``"full"`` or a model without adapters).
    """
    modules = adapter_modules(model)
    for name, module in modules.items():
        try:
            module.merge(safe_merge=safe_merge)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    if remove:
        for name, module in modules.items():
            _replace(model, name, module.base_layer)
        _forget_config(model)
    return list(modules)


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every adapter merged into a plain ``nn.Linear`` (:func:`merge` with
    ``remove=True``): its state dict has the vanilla model's layout. ``model`` itself is untouched."""
    merged = copy.deepcopy(model)
    merge(merged, remove=True)
    return merged


def linear_weight_share(model: nn.Module, rule: str = "student") -> float:
    """Share of all parameters of ``model`` held by the weights of the Linears that ``rule`` adapts: what LoRaD
    can rotate (in SD1.5 the adapted Linears hold 270M of 860M parameters; no convolution is adapted)."""
    adapted = sum(model.get_submodule(name).weight.numel() for name in select_layers(model, rule))
    return adapted / sum(p.numel() for p in model.parameters())


def unmerge(model: nn.Module) -> list[str]:
    """Undo :func:`merge` (``remove=False``): every merged adapter restores its base weight. Returns the names."""
    names = [name for name, module in adapter_modules(model).items() if module.merged]
    for name in names:
        model.get_submodule(name).unmerge()
    return names


def remove(model: nn.Module) -> list[str]:
    """Drop every adapter: plain ``nn.Linear`` layers with the original (unmerged) weights come back.

    Parameters frozen by :func:`inject` stay frozen. Returns the names of the removed adapters.
    """
    modules = adapter_modules(model)
    for name, module in modules.items():
        if module.merged:
            module.unmerge()
        _replace(model, name, module.base_layer)
    _forget_config(model)
    return list(modules)


def _forget_config(model: nn.Module) -> None:
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters and buffers (never the base layer's), named relative to ``model``."""
    return {
        f"{name}.{key}": tensor
        for name, module in adapter_modules(model).items()
        for key, tensor in module.state_dict(keep_vars=True).items() if not key.startswith("base_layer.")
    }


def _require_adapters(model: nn.Module, action: str) -> AdapterConfig:
    config = adapter_config(model)
    if config is None or config.method == "full":
        raise ValueError(
            f"cannot {action}: the model has no adapter modules (inject(model, method, rank, ...) with a method "
            "other than 'full' first; for full fine-tuning use model.state_dict())"
        )
    merged = [name for name, module in adapter_modules(model).items() if module.merged]
    if merged:
        raise ValueError(f"cannot {action}: {len(merged)} adapters are merged (e.g. {merged[0]!r}); "
                         "unmerge(model) first")
    return config


def _metadata(config: AdapterConfig) -> dict[str, str]:
    return {"format": _FORMAT, **{k: json.dumps(v) for k, v in asdict(config).items()}}


def _few(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _copy_into(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    missing, unknown = set(targets) - set(state), set(state) - set(targets)
    if missing or unknown:
        raise ValueError(
            f"{source} does not match the injected adapters: missing {_few(missing) or 'none'}; "
            f"unknown {_few(unknown) or 'none'}"
        )
    for key, target in targets.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                             f"the adapter expects {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def save_adapters(model: nn.Module, path: str | Path) -> None:
    """Write the adapter tensors only (``<module>.theta_a`` / ``.theta_b``, ``.lora_A`` / ``.lora_B`` /
    ``.magnitude``) as safetensors, atomically, with the :class:`AdapterConfig` as metadata."""
    config = _require_adapters(model, "save adapters")
    tensors = {k: v.detach().contiguous().cpu() for k, v in _adapter_tensors(model).items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=_metadata(config))


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load :func:`save_adapters` output into a model injected with the same method/rank/rule/alpha/exclude.

    Raises:
        ValueError: not an adapter file, a metadata mismatch (each differing field named), or missing/unknown
            tensor names.
    """
    config = _require_adapters(model, "load adapters")
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an adapter file written by save_adapters (metadata {meta})")
    expected = _metadata(config)
    diff = [f"{k}: file {meta.get(k)} vs model {v}" for k, v in expected.items() if meta.get(k) != v]
    if diff:
        raise ValueError(f"{path} was saved for other adapters ({'; '.join(diff)}); inject the model to match")
    _copy_into(_adapter_tensors(model), load_file(str(path)), str(path))


def load_official_thetas(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy official LoRaD parameters into the injected :class:`LoRaDLinear` modules.

    The official training code (``train_dkd_sd.py``) names them ``<module>.theta_a`` / ``<module>.theta_b``
    with the vanilla model's module names, e.g.
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.theta_a`` — the same names
    :func:`save_adapters` uses. ``state`` must hold exactly those of the injected layers.

    Raises:
        ValueError: the model has no LoRaD adapters, or ``state`` has missing/unknown keys (a few are listed)
            or wrong shapes.
    """
    config = _require_adapters(model, "load official thetas")
    if config.method != "lorad":
        raise ValueError(f"official thetas are LoRaD parameters, but the model was injected with {config.method!r}")
    _copy_into(_adapter_tensors(model), state, "official theta state")
