"""One look for every figure and table: theme, method colours, image grids, atomic saving to ``results/``.

A notebook's imports cell calls :func:`set_theme` once; figures go to ``results/figures/<name>.{png,pdf}`` via
:func:`save_figure` and tables to ``results/tables/<name>.{csv,md,tex}`` via :func:`save_table` (the results
directory is ``WADI_RESULTS_DIR`` when set, see :func:`wadi_core.artifacts.results_dir`); every name starts with
the notebook's number (``NN_name``). Every file is written to a temporary name and renamed, so an interrupted save
never leaves half a file behind. Each notebook ends with :func:`claims_table`: paper value, measured value, holds?
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from wadi_core.artifacts import atomic_path, results_dir

# One colour per method in every figure (Okabe-Ito, colour-blind safe); WaDi's LoRaD gets the strongest hue.
METHOD_COLORS: dict[str, str] = {
    "teacher": "#000000",
    "full": "#E69F00",  # full fine-tune (SwiftBrush)
    "lora": "#56B4E9",
    "dora": "#009E73",
    "dora_frozen_norm": "#CC79A7",  # DoRA with its magnitude vector frozen
    "lorad": "#D55E00",  # LoRaD, the WaDi student
}
METHOD_LABELS: dict[str, str] = {
    "teacher": "Teacher (multi-step)",
    "full": "Full FT (SwiftBrush)",
    "lora": "LoRA",
    "dora": "DoRA",
    "dora_frozen_norm": "DoRA (frozen norm)",
    "lorad": "LoRaD (WaDi)",
}

FIGURE_FORMATS = ("png", "pdf")


def set_theme() -> None:
    """Apply the project's figure theme: seaborn whitegrid, method palette, modest inline dpi."""
    sns.set_theme(context="notebook", style="whitegrid", palette=list(METHOD_COLORS.values()))
    mpl.rcParams.update(
        {
            "figure.dpi": 80,  # inline PNGs in committed notebooks stay small
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "image.interpolation": "nearest",  # 32x32 samples are shown as pixels, not blurred
            "pdf.fonttype": 42,  # editable text in the PDFs
        }
    )


def _output_path(kind: str, name: str, suffix: str) -> Path:
    if not name or Path(name).name != name or Path(name).suffix:
        raise ValueError(f"name must be a bare file stem such as '01_weight_change', got {name!r}")
    return results_dir() / kind / f"{name}.{suffix}"


def save_figure(fig: Figure, name: str) -> list[Path]:
    """Write ``fig`` to ``results/figures/<name>.png`` and ``.pdf`` atomically; return the paths."""
    paths = []
    for fmt in FIGURE_FORMATS:
        path = _output_path("figures", name, fmt)
        # Without a creation date the PDF is byte-identical across runs.
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata)
        paths.append(path)
    return paths


def save_table(df: pd.DataFrame, name: str, caption: str | None = None, float_format: str = ".4g") -> list[Path]:
    """Write ``df`` to ``results/tables/<name>.csv``, ``.md`` and ``.tex`` atomically; return the paths.

    The CSV keeps full precision (for re-reading); the Markdown and LaTeX round floats with ``float_format``
    (a format spec such as ``".4g"`` or ``".2f"``). The index is written unless it is a plain 0..n-1 range.

    Args:
        df: the table.
        name: file stem, e.g. ``"table1_coco14_fid"``.
        caption: written under the Markdown table and as the LaTeX caption.
        float_format: format spec for floats in the Markdown and LaTeX files.
    """
    index = not isinstance(df.index, pd.RangeIndex)
    markdown = df.to_markdown(index=index, floatfmt=float_format)
    if caption:
        markdown += f"\n\nTable: {caption}"
    latex = df.to_latex(
        index=index,
        escape=True,
        caption=caption,
        label=f"tab:{name}",
        float_format=lambda value: format(value, float_format),
    )
    texts = {"csv": df.to_csv(index=index), "md": markdown + "\n", "tex": latex}
    paths = []
    for suffix, text in texts.items():
        path = _output_path("tables", name, suffix)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        paths.append(path)
    return paths


def image_grid_figure(
    images,
    nrow: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 3,
    title: str | None = None,
) -> Figure:
    """Tile small images into one figure, upscaled with nearest neighbours so every pixel stays sharp.

    Args:
        images: ``(N, C, H, W)`` torch tensor or numpy array in [0, 1], C = 3 (RGB) or 1 (grey); filled row by row.
        nrow: number of rows; the column count is ``ceil(N / nrow)`` and missing cells stay white.
        row_labels: one label per row, written on the left.
        col_labels: one label per column, written on top.
        scale: integer upscaling factor per image pixel.
        title: optional figure title.
    """
    array = _as_nchw_array(images)
    n, _, height, width = array.shape
    ncol = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != nrow:
        raise ValueError(f"{len(row_labels)} row labels for {nrow} rows")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"{len(col_labels)} column labels for {ncol} columns")

    pad = 1  # white pixels between tiles, before upscaling
    canvas = np.ones((nrow * (height + pad) - pad, ncol * (width + pad) - pad, 3))
    for i, image in enumerate(array):
        top, left = (i // ncol) * (height + pad), (i % ncol) * (width + pad)
        canvas[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)

    dpi = mpl.rcParams["figure.dpi"]
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / dpi + 1.5, canvas.shape[0] / dpi + 0.8))
    ax.imshow(canvas, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks([(c * (width + pad) + width / 2) * scale for c in range(ncol)] if col_labels else [])
    ax.set_yticks([(r * (height + pad) + height / 2) * scale for r in range(nrow)] if row_labels else [])
    if col_labels:
        ax.set_xticklabels(col_labels)
        ax.xaxis.tick_top()
    if row_labels:
        ax.set_yticklabels(row_labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return fig


def _as_nchw_array(images) -> np.ndarray:
    """``(N, C, H, W)`` float array in [0, 1] with 3 channels, from a torch tensor or numpy array."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    array = np.asarray(images, dtype=np.float64)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W), got {array.shape}")
    if array.shape[1] == 1:
        array = array.repeat(3, axis=1)
    return array.clip(0.0, 1.0)


class Claim(NamedTuple):
    """One row of a notebook's claims cell: what the paper says, what this run measured, and whether it holds.

    ``holds`` is None where the claim cannot be measured in this run (e.g. a GPU timing on a CPU).
    """

    claim: str
    paper: str
    measured: str
    holds: bool | None


def claims_table(claims: Iterable[Claim | tuple], notebook: str, caption: str | None = None) -> pd.DataFrame:
    """The claims table of notebook ``notebook`` (``"00"`` ... ``"06"``), indexed by claim with the columns
    ``paper``, ``measured`` and ``holds``, saved as ``results/tables/<notebook>_claims.{csv,md,tex}``."""
    if not re.fullmatch(r"\d\d", notebook):
        raise ValueError(f"notebook must be a two-digit notebook number such as '03', got {notebook!r}")
    rows = [Claim(*claim) for claim in claims]
    if not rows:
        raise ValueError("a claims table needs at least one claim")
    for row in rows:
        if row.holds is not None and not isinstance(row.holds, (bool, np.bool_)):
            raise TypeError(f"'holds' must be a bool or None, got {row.holds!r} for claim {row.claim!r}")
    table = pd.DataFrame(
        [{**row._asdict(), "holds": None if row.holds is None else bool(row.holds)} for row in rows]
    ).set_index("claim")
    if table.index.duplicated().any():
        raise ValueError(f"duplicate claims: {sorted(set(table.index[table.index.duplicated()]))}")
    save_table(table, f"{notebook}_claims", caption=caption or f"Notebook {notebook} claims: paper vs this run")
    return table
