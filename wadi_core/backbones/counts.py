"""Trainable-parameter counts of WaDi's Table 1 and of its student-rank ablation, from the meta-device configs
and the official layer rule (``register_hooks``): exact integers, no weights."""

from __future__ import annotations

import copy

import pandas as pd
from torch import nn

from ..adapters import count_trainable, inject
from ..paper_numbers import FAKE_RANK, RANK_ABLATION, STUDENT_RANK_PIXART, STUDENT_RANK_SD, WADI_TRAINABLE_M
from .paper import build_meta_model, count_parameters

# (row, backbone, method, rank, rule, exclude, paper's number in millions or None where the paper gives none)
PAPER_COUNTS: tuple[tuple[str, str, str, int, str, tuple[str, ...], float | None], ...] = (
    ("Table 1: WaDi on SD1.5", "sd15", "lorad", STUDENT_RANK_SD, "student", (), WADI_TRAINABLE_M["sd15"]),
    ("Table 1: WaDi on SD2.1", "sd21-base", "lorad", STUDENT_RANK_SD, "student", (), WADI_TRAINABLE_M["sd21-base"]),
    ("Table 1: WaDi on PixArt-α (student rule)", "pixart-alpha-256", "lorad", STUDENT_RANK_PIXART, "student", (),
     WADI_TRAINABLE_M["pixart-alpha-256"]),
    ("PixArt-α without the 3 adaln_single Linears", "pixart-alpha-256", "lorad", STUDENT_RANK_PIXART, "student",
     ("adaln_single",), WADI_TRAINABLE_M["pixart-alpha-256"]),
    *((f"Rank ablation {letter}: r={rank}", "sd15", "lorad", rank, "student", (), RANK_ABLATION[rank].trainable / 1e6)
      for letter, rank in zip("ABCD", RANK_ABLATION)),
    (f"Fake score on SD1.5 (code: r={FAKE_RANK})", "sd15", "lorad", FAKE_RANK, "fake", (), None),
    (f"LoRA at the same rank on SD1.5 (r={STUDENT_RANK_SD})", "sd15", "lora", STUDENT_RANK_SD, "student", (), None),
)


def count_adapter_parameters(backbone: str | nn.Module, method: str, rank: int, rule: str = "student",
                             exclude: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """(adapted Linears, trainable parameters, backbone parameters) of ``method`` injected into ``backbone``: a
    paper backbone's name (built on the meta device, no weights) or a model (a copy is adapted, not the model)."""
    model = build_meta_model(backbone) if isinstance(backbone, str) else copy.deepcopy(backbone)
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
