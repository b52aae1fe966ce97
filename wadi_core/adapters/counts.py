"""Trainable-parameter counts of WaDi's Table 1 and of its student-rank ablation, from the meta-device configs
and the official layer rule (``register_hooks``): exact integers, no weights."""

from __future__ import annotations

import pandas as pd

from ..backbones.paper import build_meta_model, count_parameters
from .inject import count_trainable, inject

# (row, backbone, method, rank, rule, exclude, paper's number in millions or None where the paper gives none)
PAPER_COUNTS: tuple[tuple[str, str, str, int, str, tuple[str, ...], float | None], ...] = (
    ("Table 1: WaDi on SD1.5", "sd15", "lorad", 256, "student", (), 83.80),
    ("Table 1: WaDi on SD2.1", "sd21-base", "lorad", 256, "student", (), 94.43),
    ("Table 1: WaDi on PixArt-α (student rule)", "pixart-alpha-256", "lorad", 128, "student", (), 81.22),
    ("PixArt-α without the 3 adaln_single Linears", "pixart-alpha-256", "lorad", 128, "student", ("adaln_single",),
     81.22),
    ("Rank ablation A: r=64", "sd15", "lorad", 64, "student", (), 20.95),
    ("Rank ablation B: r=128", "sd15", "lorad", 128, "student", (), 41.90),
    ("Rank ablation C: r=256", "sd15", "lorad", 256, "student", (), 83.80),
    ("Rank ablation D: r=512", "sd15", "lorad", 512, "student", (), 167.59),
    ("Fake score on SD1.5 (code: r=32)", "sd15", "lorad", 32, "fake", (), None),
    ("LoRA at the same rank on SD1.5 (r=256)", "sd15", "lora", 256, "student", (), None),
)
PAPER_BACKBONE_TOTALS = {"sd15": 860, "sd21-base": 865, "pixart-alpha-256": 611}  # Table 1 "#Params", millions


def count_adapter_parameters(backbone: str, method: str, rank: int, rule: str = "student",
                             exclude: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """(adapted Linears, trainable parameters, backbone parameters) of ``method`` injected into a meta model."""
    model = build_meta_model(backbone)
    total = count_parameters(model)
    names = inject(model, method, rank, rule=rule, exclude=exclude)
    return len(names), count_trainable(model), total


def parameter_count_table() -> pd.DataFrame:
    """One row per setting of :data:`PAPER_COUNTS`: our exact count beside the paper's reported number."""
    rows = []
    for row, backbone, method, rank, rule, exclude, paper in PAPER_COUNTS:
        layers, trainable, total = count_adapter_parameters(backbone, method, rank, rule, exclude)
        rows.append({
            "setting": row, "backbone": backbone, "method": method, "rank": rank, "rule": rule,
            "adapted Linears": layers, "trainable (exact)": trainable, "trainable (M)": round(trainable / 1e6, 2),
            "paper (M)": paper, "matches paper": None if paper is None else round(trainable / 1e6, 2) == paper,
            "share of backbone": trainable / total,
        })
    return pd.DataFrame(rows).set_index("setting")
