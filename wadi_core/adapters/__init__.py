"""Adapters for the one-step student and the fake score: LoRaD (the paper's) and the LoRA / DoRA / full-FT
baselines (WaDi §3.2; ``docs/paper_notes.md#lorad``).

One module per method (:mod:`.lorad`, :mod:`.lora`, :mod:`.dora`), each with its ``XLinear`` wrapping a frozen
``nn.Linear``; :mod:`.inject` holds the layer rules and the model-level operations (inject, merge/unmerge/remove,
save/load, official-θ import, parameter counting).
"""

from .dora import DoRALinear
from .inject import (
    ADAPTER_TYPES,
    FAKE_SKIP,
    METHODS,
    RULES,
    AdapterConfig,
    adapter_config,
    adapter_modules,
    count_trainable,
    inject,
    linear_weight_share,
    load_adapters,
    load_official_thetas,
    merge,
    merged_copy,
    remove,
    save_adapters,
    select_layers,
    unmerge,
)
from .lora import LoRALinear
from .lorad import LoRaDFunction, LoRaDLinear, lorad_rotate

__all__ = [
    "ADAPTER_TYPES",
    "FAKE_SKIP",
    "METHODS",
    "RULES",
    "AdapterConfig",
    "DoRALinear",
    "LoRALinear",
    "LoRaDFunction",
    "LoRaDLinear",
    "adapter_config",
    "adapter_modules",
    "count_trainable",
    "inject",
    "linear_weight_share",
    "load_adapters",
    "load_official_thetas",
    "lorad_rotate",
    "merge",
    "merged_copy",
    "remove",
    "save_adapters",
    "select_layers",
    "unmerge",
]
