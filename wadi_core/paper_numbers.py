"""Every number the WaDi paper reports that this companion compares against: one place, one value each.

Source: *WaDi: Weight Direction-aware Distillation for One-step Image Synthesis* (CVPR 2026, arXiv 2603.08258),
its figures and tables as published with the official code (``results-tab.png`` is Table 1, ``motivation.png`` is
Fig. 1). Where a value is read off a plot or comes from the ablation tables that only the paper's summaries
transcribe, the comment says so; ``docs/paper_notes.md`` explains what is known and what is inferred. Notebooks
read these constants in their claims cells (:func:`wadi_core.reporting.claims_table`) and never retype them.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_TITLE = "WaDi: Weight Direction-aware Distillation for One-step Image Synthesis"
PAPER_URL = "https://arxiv.org/abs/2603.08258"


@dataclass(frozen=True)
class Table1Row:
    """One row of Table 1 (zero-shot COCO-2014): sizes in parameters, CLIP score as the raw cosine."""

    params: float
    nfe: int
    adapter: str
    trainable: float
    fid: float
    clip: float | None
    precision: float | None
    recall: float | None


# Table 1, SD1.5 block (COCO-2014 30k). DMD2* and SiD-LSG* were re-trained by the authors on the same 1.4M prompts.
TABLE1_SD15: dict[str, Table1Row] = {
    "SD 1.5 (cfg=3.0)": Table1Row(860e6, 25, "U-Net", 860e6, 8.78, 0.30, 0.59, 0.53),
    "LCM-LoRA": Table1Row(860e6, 1, "LoRA", 67.50e6, 77.73, 0.24, 0.22, 0.15),
    "InstaFlow": Table1Row(860e6, 1, "U-Net", 860e6, 13.10, 0.28, 0.53, 0.45),
    "UFOGen": Table1Row(860e6, 1, "U-Net", 860e6, 12.78, None, None, None),
    "DMD": Table1Row(860e6, 1, "U-Net", 860e6, 11.49, 0.32, None, None),
    "DMD2*": Table1Row(860e6, 1, "U-Net", 860e6, 12.96, 0.30, 0.60, 0.47),
    "SiD-LSG*": Table1Row(860e6, 1, "U-Net", 860e6, 14.27, 0.30, 0.56, 0.48),
    "PCM": Table1Row(860e6, 1, "U-Net", 860e6, 17.91, 0.29, None, None),
    "Hyper-SD": Table1Row(860e6, 1, "LoRA", 67.25e6, 22.90, 0.31, 0.62, 0.25),
    "YOSO": Table1Row(860e6, 1, "LoRA", 67.25e6, 23.68, 0.29, 0.56, 0.36),
    "WaDi (LoRaD)": Table1Row(860e6, 1, "LoRaD", 83.80e6, 10.79, 0.31, 0.62, 0.48),
}
TABLE1_TEACHER = "SD 1.5 (cfg=3.0)"
TABLE1_WADI = "WaDi (LoRaD)"
TEACHER_GUIDANCE_SCALE = 3.0  # Table 1: the SD1.5 teacher is sampled with CFG 3
TEACHER_STEPS = 25  # Table 1: the SD1.5 teacher's NFE column
# ᾱ at t = 999 of SD1.5's DDPM schedule, which WaDi's one-step formula uses; the official train_dkd_dit.py
# hard-codes the same value for PixArt-α.
SD15_ALPHA_BAR_T = 0.0047

# Table 1, WaDi rows of the other two backbones (trainable parameters; FID / CLIP / precision / recall).
TABLE1_WADI_SD21 = Table1Row(865e6, 1, "LoRaD", 94.43e6, 12.34, 0.31, 0.60, 0.48)
TABLE1_WADI_PIXART = Table1Row(610.86e6, 1, "LoRaD", 81.22e6, 18.99, 0.30, 0.64, 0.29)


@dataclass(frozen=True)
class AdapterAblationRow:
    """The adapter ablation (LoRA / DoRA / DoRA with frozen norm / FT / LoRaD students): student parameters,
    FID, and the direction mean change in percent."""

    trainable: float
    fid: float
    direction_change_pct: float


# Adapter ablation on SD1.5 with the VSD loop; its benchmark is COCO-2017 per the paper's summary.
ADAPTER_ABLATION: dict[str, AdapterAblationRow] = {
    "lora": AdapterAblationRow(120.9e6, 25.27, 0.83),
    "dora": AdapterAblationRow(121.2e6, 26.56, 0.55),
    "dora_frozen_norm": AdapterAblationRow(120.9e6, 24.52, 0.92),
    "full": AdapterAblationRow(860.0e6, 23.30, 2.21),  # "FT (DMD2)"
    "lorad": AdapterAblationRow(83.8e6, 20.86, 2.89),
}


@dataclass(frozen=True)
class RankAblationRow:
    """The student-rank ablation (SD1.5, COCO-2014, fake rank 32)."""

    trainable: float
    fid: float
    clip: float


RANK_ABLATION: dict[int, RankAblationRow] = {
    64: RankAblationRow(20.95e6, 13.64, 0.30),
    128: RankAblationRow(41.90e6, 13.16, 0.29),
    256: RankAblationRow(83.80e6, 10.79, 0.31),
    512: RankAblationRow(167.59e6, 12.75, 0.30),
}
STUDENT_RANK_SD = 256  # the paper's student rank on SD1.5 / SD2.1 (official code: ``register_hooks``)
STUDENT_RANK_PIXART = 128
FAKE_RANK = 32  # the fake score's rank (official code: ``register_hooks_teacher``)

# Table 1's "Trainable" column of the WaDi rows, in millions, per backbone.
WADI_TRAINABLE_M: dict[str, float] = {"sd15": 83.80, "sd21-base": 94.43, "pixart-alpha-256": 81.22}
BACKBONE_PARAMS_M: dict[str, float] = {"sd15": 860, "sd21-base": 865, "pixart-alpha-256": 610.86}  # "#Params"

# Fig. 1(a): DMD2 vs SD1.5, all-layer means and stds over neurons, in percent (read off the figure).
FIG1_DIRECTION_MEAN_PCT = 2.2
FIG1_DIRECTION_STD_PCT = 2.1
FIG1_NORM_MEAN_PCT = 0.1
FIG1_NORM_STD_PCT = 0.2
FIG1_MEAN_RATIO = 22  # "the mean change of the direction is 22x that of the norm"
FIG1_STD_RATIO = 10
# Fig. 1(b): mean energy of the direction residual within 30 % of the full rank.
FIG1_RANK_FRACTION = 0.3
FIG1_RESIDUAL_ENERGY = 0.93
# Fig. 1(c): DMD2 with the teacher's norms or directions put back: (FID, CLIP score).
FIG1_SWAPS: dict[str, tuple[float, float]] = {
    "norm from teacher": (10.1, 0.30),
    "direction from teacher": (250.7, 0.12),
    "vanilla one-step": (9.4, 0.30),
}

# Downstream tasks (the paper's last section): wall time per image, multi-step pipeline vs the one-step student.
CONTROLNET_SECONDS = (4.73, 0.65)  # ControlNet + DDIM 50 steps vs WaDi one step
CONTROLNET_TIME_SAVING = 0.8626
REVERSION_SECONDS = (1.44, 0.16)  # ReVersion + DDIM 50 steps vs WaDi one step
REVERSION_TIME_SAVING = 0.8889


def table1_fid_ratio() -> float:
    """WaDi's FID over its SD1.5 teacher's in Table 1 (10.79 / 8.78)."""
    return TABLE1_SD15[TABLE1_WADI].fid / TABLE1_SD15[TABLE1_TEACHER].fid
