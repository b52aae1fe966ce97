"""Weight-change analysis of a one-step student against its teacher (WaDi Fig. 1(a)–(c)).

The paper splits every weight into a norm and a direction (DoRA-style, W = ‖W‖_c · W/‖W‖_c) and finds that
distillation changes the directions far more than the norms (Fig. 1(a)), that the direction residual is low-rank
(Fig. 1(b)), and that a student given the teacher's norms still works while one given the teacher's directions
does not (Fig. 1(c)). The paper does not state its exact definitions; this module implements the reconstruction
of ``docs/paper_notes.md#weight-change-analysis``, stated here once for all functions:

Notation (PyTorch layout; a conv weight (out, in, kh, kw) is viewed as (out, in·kh·kw))::

    w_t,i , w_s,i   row i of the teacher / student weight = the weight vector of output neuron i
    n_t,i = ‖w_t,i‖  L2 norm of that row (the paper's column norm ‖W‖_c for W ∈ R^{d×k}, d = input dim)
    norm change      |n_s,i − n_t,i| / n_t,i                      (relative, per output neuron)
    direction change 1 − cos(w_s,i, w_t,i)      or, angle=True:   arccos(clamp(cos, −1, 1))  (radians)
    Ŵ                W with every row divided by its norm (a zero row stays zero)
    residual R       Ŵ_s − Ŵ_t                                     (Fig. 1(b), per output neuron)

Layers: every floating-point tensor with ≥ 2 dims whose state-dict name is ``weight`` or ends in ``.weight``
(Linear, attention projections, convs, embeddings); 1-D tensors (norms, biases) and buffers not named ``weight``
are not layers. Kinds: "conv" for ≥ 3-D weights, "attention" for 2-D weights whose name contains ``attn``,
``to_q``, ``to_k``, ``to_v`` or ``to_out``, "linear" otherwise. Everything is computed in float64, one layer at a
time (a float64 copy of one layer pair at most), on the teacher tensor's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

StateLike = Mapping[str, torch.Tensor] | nn.Module
LayerFilter = Iterable[str] | Callable[[str], bool] | None

CHANGE_COLUMNS = (
    "layer", "kind", "shape", "out", "in", "numel", "norm_mean", "norm_std", "direction_mean", "direction_std"
)
ENERGY_COLUMNS = ("layer", "kind", "k", "min_dim", "energy")
SWAP_TAKES = ("norm", "direction")
_ATTENTION_MARKERS = ("attn", "to_q", "to_k", "to_v", "to_out")


# ---------------------------------------------------------------------------------------------------------------
# Per-tensor maths (pure functions; the model-level functions below only loop over layers and call these).
# ---------------------------------------------------------------------------------------------------------------


def _rows(weight: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A ≥ 2-D weight as a float64 (out, in·k·k) matrix (a view-then-copy of one layer only)."""
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    return weight.detach().to(device=device, dtype=torch.float64).reshape(weight.shape[0], -1)


def _normalise_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ, ‖W‖_row): rows divided by their L2 norm; a zero row stays zero (0/0 := 0)."""
    norms = torch.linalg.vector_norm(matrix, dim=1)  # (out,)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return matrix / safe[:, None], norms


def row_changes(
    w_teacher: torch.Tensor, w_student: torch.Tensor, angle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-neuron relative norm change and direction change of one weight (Fig. 1(a)).

    Rows whose teacher norm is 0 are dropped (the relative change is undefined), so both returned tensors have
    one entry per row with ‖w_t,i‖ > 0. A zero student row (teacher row non-zero) has cos := 0: norm change 1,
    direction change 1 (π/2 with ``angle=True``).

    Args:
        w_teacher: teacher weight, (out, in) or (out, in, kh, kw) — viewed as (out, in·kh·kw).
        w_student: student weight of the same shape.
        angle: direction change as arccos(cos) in radians instead of 1 − cos.

    Returns:
        (norm_change, direction_change), two float64 tensors of shape (rows kept,).
    """
    if w_teacher.shape != w_student.shape:
        raise ValueError(f"teacher weight {tuple(w_teacher.shape)} and student weight {tuple(w_student.shape)} differ")
    # 1. Both weights as float64 (out, in·k·k) rows on the teacher's device.
    teacher = _rows(w_teacher)
    student = _rows(w_student, teacher.device)
    # 2. Row norms; keep the rows where the teacher's norm is non-zero.
    norm_t = torch.linalg.vector_norm(teacher, dim=1)
    norm_s = torch.linalg.vector_norm(student, dim=1)
    keep = norm_t > 0
    teacher, student, norm_t, norm_s = teacher[keep], student[keep], norm_t[keep], norm_s[keep]
    # 3. Norm change |n_s − n_t| / n_t and cosine, clamped against rounding (cos = 0 for a zero student row).
    norm_change = (norm_s - norm_t).abs() / norm_t
    cos = (teacher * student).sum(dim=1) / (norm_t * norm_s).clamp_min(torch.finfo(torch.float64).tiny)
    cos = cos.clamp(-1.0, 1.0)
    direction_change = torch.arccos(cos) if angle else 1.0 - cos
    return norm_change, direction_change


def direction_residual(w_teacher: torch.Tensor, w_student: torch.Tensor) -> torch.Tensor:
    """R = Ŵ_s − Ŵ_t, the direction residual of one weight (Fig. 1(b)), float64 (out, in·k·k).

    Each output neuron's row is normalised on its own (the paper's ‖W‖_c, the axis LoRaD keeps), not the
    whole matrix; a zero row stays zero.
    """
    if w_teacher.shape != w_student.shape:
        raise ValueError(f"teacher weight {tuple(w_teacher.shape)} and student weight {tuple(w_student.shape)} differ")
    teacher_hat, _ = _normalise_rows(_rows(w_teacher))
    student_hat, _ = _normalise_rows(_rows(w_student, teacher_hat.device))
    return student_hat - teacher_hat


def rank_k(rank_fraction: float, min_dim: int) -> int:
    """k = ⌊rank_fraction · min_dim⌋, at least 1 (Fig. 1(b)).

    Floor, not ceil: it reproduces the x-values of Fig. 1(b) (k ≈ 1, 10, 96, 192, 230, 384 for full ranks 4, 36,
    320, 640, 768, 1280); ceil would give 2, 11, …, 231. A 1e-9 slack absorbs float rounding (0.3 · 10 = 3.0000…4).
    """
    if not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
    return max(1, min(min_dim, math.floor(rank_fraction * min_dim + 1e-9)))


def cumulative_energy(residual: torch.Tensor, k: int, use_sigma: bool = False) -> float:
    """Share of the residual's spectrum in its top-k singular values: Σ_{i≤k} σ_i² / Σ_i σ_i² (Fig. 1(b)).

    Args:
        residual: a 2-D matrix (e.g. :func:`direction_residual`).
        k: number of leading singular values.
        use_sigma: Σ_{i≤k} σ_i / Σ_i σ_i instead (the paper does not say which; σ² is the usual "energy").

    Returns:
        The fraction in [0, 1]; NaN when the residual is exactly zero (no energy to share).
    """
    if residual.dim() != 2:
        raise ValueError(f"expected a 2-D residual, got shape {tuple(residual.shape)}")
    if not torch.any(residual != 0):
        return float("nan")
    sigma = torch.linalg.svdvals(residual.to(torch.float64))  # descending, (min_dim,)
    weights = sigma if use_sigma else sigma.square()
    return float(weights[:k].sum() / weights.sum())


def swap_weight(w_teacher: torch.Tensor, w_student: torch.Tensor, take: str = "norm") -> torch.Tensor:
    """One weight rebuilt with one component taken from the teacher (the rebuild rule of Fig. 1(c)).

    take="norm":       W = ‖W_t‖_row · W_s / ‖W_s‖_row    (student direction, teacher norm; ①/④)
    take="direction":  W = ‖W_s‖_row · W_t / ‖W_t‖_row    (teacher direction, student norm; ②/⑤)

    A row whose direction source is a zero row stays zero. Returns a new tensor with the student's shape, dtype
    and device; the inputs are not changed.
    """
    if take not in SWAP_TAKES:
        raise ValueError(f"unknown take {take!r}; choose one of {', '.join(SWAP_TAKES)}")
    if w_teacher.shape != w_student.shape:
        raise ValueError(f"teacher weight {tuple(w_teacher.shape)} and student weight {tuple(w_student.shape)} differ")
    # 1. Directions and row norms of both weights, float64 on the student's device.
    teacher_hat, norm_t = _normalise_rows(_rows(w_teacher, w_student.device))
    student_hat, norm_s = _normalise_rows(_rows(w_student))
    # 2. Recombine one side's direction with the other side's norm, back to the student's shape and dtype.
    rebuilt = norm_t[:, None] * student_hat if take == "norm" else norm_s[:, None] * teacher_hat
    return rebuilt.reshape(w_student.shape).to(w_student.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Layer selection and the model-level loops.
# ---------------------------------------------------------------------------------------------------------------


def _state_dict(model: StateLike, role: str) -> Mapping[str, torch.Tensor]:
    """A module's state dict (tensors shared, not copied) or the mapping itself."""
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise ValueError(f"{role} must be a state dict (name → tensor) or an nn.Module, got {type(model).__name__}")


def _first(names: Iterable[str], count: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(repr(name) for name in names[:count])
    return shown + (f", … ({len(names)} in all)" if len(names) > count else "")


def _check_pair(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first few keys present in only one state dict, or whose shapes differ."""
    only_teacher, only_student = set(teacher) - set(student), set(student) - set(teacher)
    if only_teacher or only_student:
        parts = [f"only in teacher: {_first(only_teacher)}" if only_teacher else "",
                 f"only in student: {_first(only_student)}" if only_student else ""]
        raise ValueError("teacher and student state dicts have different keys; " + "; ".join(p for p in parts if p))
    mismatched = [name for name in teacher if tuple(teacher[name].shape) != tuple(student[name].shape)]
    if mismatched:
        details = ", ".join(f"{name!r} {tuple(teacher[name].shape)} vs {tuple(student[name].shape)}"
                            for name in mismatched[:5])
        more = f", … ({len(mismatched)} in all)" if len(mismatched) > 5 else ""
        raise ValueError(f"teacher and student tensors differ in shape: {details}{more}")


def _is_layer(name: str, tensor: torch.Tensor) -> bool:
    return (name == "weight" or name.endswith(".weight")) and tensor.dim() >= 2 and tensor.is_floating_point()


def layer_kind(name: str, tensor: torch.Tensor) -> str:
    """"conv" for ≥ 3-D weights, "attention" for attention projections, "linear" for other 2-D weights."""
    if tensor.dim() >= 3:
        return "conv"
    return "attention" if any(marker in name for marker in _ATTENTION_MARKERS) else "linear"


def select_weights(state: StateLike, layers: LayerFilter = None) -> list[str]:
    """Names of the analysed layers of ``state`` in state-dict order (see the module docstring for the rule).

    Args:
        state: a state dict or an nn.Module.
        layers: None (all layers), an iterable of layer names (each must be a layer), or a callable
            ``name -> bool`` applied to the layer names.
    """
    state = _state_dict(state, "state")
    names = [name for name, tensor in state.items() if _is_layer(name, tensor)]
    if layers is None:
        return names
    if callable(layers):
        return [name for name in names if layers(name)]
    wanted = [layers] if isinstance(layers, str) else list(layers)
    unknown = set(wanted) - set(names)
    if unknown:
        raise ValueError(f"not analysable layers (need a ≥2-D floating '.weight' tensor): {_first(unknown)}")
    wanted_set = set(wanted)
    return [name for name in names if name in wanted_set]


def _layer_pairs(
    teacher: StateLike, student: StateLike, layers: LayerFilter, progress: bool, desc: str
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Check the pair, then yield (name, teacher tensor, student tensor) layer by layer under a progress bar."""
    teacher, student = _state_dict(teacher, "teacher"), _state_dict(student, "student")
    _check_pair(teacher, student)
    for name in tqdm(select_weights(teacher, layers), desc=desc, disable=not progress, mininterval=1.0):
        yield name, teacher[name], student[name]


def weight_changes(
    teacher: StateLike, student: StateLike, layers: LayerFilter = None, angle: bool = False, progress: bool = True
) -> pd.DataFrame:
    """Per-layer norm and direction change of student vs teacher: the points of Fig. 1(a).

    For each layer, the per-output-neuron changes of :func:`row_changes` (norm change |n_s − n_t| / n_t,
    direction change 1 − cos, or the angle) are reduced to their mean and population std (ddof=0) over the
    neurons. The paper does not give these definitions; they are the DoRA-style reconstruction of
    ``docs/paper_notes.md#analysis-definitions`` (norm of each output neuron's weight vector, the axis LoRaD
    preserves; relative norm change; 1 − cos). Rows with a zero teacher norm are excluded from a layer's
    statistics (NaN if every row is zero). Multiply by 100 for the paper's percentages.

    Args:
        teacher: the multi-step teacher, a state dict or an nn.Module.
        student: the one-step student of the same architecture (same keys and shapes).
        layers: None (every ≥ 2-D weight), an iterable of layer names, or a callable ``name -> bool``.
        angle: direction change as arccos(cos) in radians instead of 1 − cos.
        progress: show a tqdm bar over layers.

    Returns:
        One row per layer with columns ``layer, kind, shape, out, in, numel, norm_mean, norm_std,
        direction_mean, direction_std``; ``shape`` is the tensor's own shape as "320×4×3×3", ``out``/``in`` the
        2-D view (in = in·kh·kw for convs).
    """
    rows = []
    for name, w_teacher, w_student in _layer_pairs(teacher, student, layers, progress, "weight changes"):
        # 1. Per-neuron changes (float64, teacher-zero rows dropped).
        norm_change, direction_change = row_changes(w_teacher, w_student, angle=angle)
        # 2. Mean and std over the layer's neurons: one point of Fig. 1(a) per series.
        if norm_change.numel() == 0:  # every teacher row is zero: no statistics
            stats = [math.nan] * 4
        else:
            stats = torch.stack([norm_change.mean(), norm_change.std(correction=0),
                                 direction_change.mean(), direction_change.std(correction=0)]).tolist()
        out_features = w_teacher.shape[0]
        rows.append({
            "layer": name, "kind": layer_kind(name, w_teacher), "shape": "×".join(map(str, w_teacher.shape)),
            "out": out_features, "in": w_teacher.numel() // out_features, "numel": w_teacher.numel(),
            "norm_mean": stats[0], "norm_std": stats[1], "direction_mean": stats[2], "direction_std": stats[3],
        })
    return pd.DataFrame(rows, columns=list(CHANGE_COLUMNS))


def summarize_changes(df: pd.DataFrame) -> dict[str, float]:
    """All-layer means of :func:`weight_changes` and their direction / norm ratios (Fig. 1(a) large markers).

    The all-layer mean is the unweighted mean of the per-layer points (NaN layers skipped).
    The paper's DMD2 vs SD1.5 numbers (Fig. 1(a)): direction mean ≈ 2.2%, norm mean ≈ 0.1% (ratio ≈ 22×), direction std
    ≈ 2.1%, norm std ≈ 0.2% (ratio ≈ 10×).

    Returns:
        ``n_layers, norm_mean, norm_std, direction_mean, direction_std, ratio_mean`` (direction_mean / norm_mean)
        and ``ratio_std`` (direction_std / norm_std); a ratio over a zero norm value is inf (NaN if both are 0).
    """
    columns = ("norm_mean", "norm_std", "direction_mean", "direction_std")
    missing = [column for column in columns if column not in df]
    if missing:
        raise ValueError(f"not a weight_changes() table: missing columns {missing}")
    means = {column: float(df[column].mean()) for column in columns}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_mean = float(np.float64(means["direction_mean"]) / np.float64(means["norm_mean"]))
        ratio_std = float(np.float64(means["direction_std"]) / np.float64(means["norm_std"]))
    return {"n_layers": int(len(df)), **means, "ratio_mean": ratio_mean, "ratio_std": ratio_std}


def residual_energy(
    teacher: StateLike,
    student: StateLike,
    rank_fraction: float = 0.3,
    layers: LayerFilter = None,
    use_sigma: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Top-k energy of each layer's direction residual R = Ŵ_s − Ŵ_t: the points of Fig. 1(b).

    Ŵ normalises each output neuron's row on its own (the paper's ‖W‖_c), not the whole matrix;
    k = ⌊rank_fraction · min(out, in·kh·kw)⌋ (at least 1; floor matches Fig. 1(b)'s x-values, see :func:`rank_k`);
    energy = Σ_{i≤k} σ_i² / Σ_i σ_i² (``use_sigma``: σ instead of σ²). A layer whose residual is exactly zero
    (e.g. the student is the teacher, or a pure per-row rescale by a power of two) gets energy NaN. The paper's
    mean over the DMD2 layers is 93%.

    Args:
        teacher, student: state dicts or nn.Modules with the same keys and shapes.
        rank_fraction: k as a fraction of the full rank min(out, in·kh·kw); the paper uses 30%.
        layers: None (every ≥ 2-D weight), an iterable of layer names, or a callable ``name -> bool``.
        use_sigma: cumulative Σσ instead of Σσ².
        progress: show a tqdm bar over layers.

    Returns:
        One row per layer with columns ``layer, kind, k, min_dim, energy``.
    """
    rank_k(rank_fraction, 1)  # validate before the loop
    rows = []
    for name, w_teacher, w_student in _layer_pairs(teacher, student, layers, progress, "residual energy"):
        # 1. Direction residual, row-normalised, float64 (out, in·k·k).
        residual = direction_residual(w_teacher, w_student)
        # 2. k from the full rank, then the top-k share of the spectrum.
        min_dim = min(residual.shape)
        k = rank_k(rank_fraction, min_dim)
        energy = cumulative_energy(residual, k, use_sigma=use_sigma)
        rows.append({"layer": name, "kind": layer_kind(name, w_teacher), "k": k, "min_dim": min_dim, "energy": energy})
    return pd.DataFrame(rows, columns=list(ENERGY_COLUMNS))


def swap(
    teacher: StateLike, student: StateLike, take: str = "norm", layers: LayerFilter = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """The student's state dict with every layer's norm or direction taken from the teacher (Fig. 1(c)).

    Per analysed layer (same selection as :func:`weight_changes`), :func:`swap_weight` rebuilds the weight per
    output row: take="norm" → ‖W_t‖ · W_s/‖W_s‖ (Fig. 1(c) ①/④, the student barely changes in the paper),
    take="direction" → ‖W_s‖ · W_t/‖W_t‖ (②/⑤, the student breaks). This is the paper's rebuild rule as
    reconstructed in ``docs/paper_notes.md#norm-and-direction-swap``. Every other tensor (biases, norms,
    unselected weights, buffers) is the student's, cloned. The inputs are never modified; the result can be loaded
    with ``model.load_state_dict``.

    Args:
        teacher, student: state dicts or nn.Modules with the same keys and shapes.
        take: "norm" or "direction": the component taken from the teacher.
        layers: None (every ≥ 2-D weight), an iterable of layer names, or a callable ``name -> bool``.
        progress: show a tqdm bar over layers.

    Returns:
        A new state dict (name → tensor) in the student's key order, dtypes and devices.
    """
    if take not in SWAP_TAKES:
        raise ValueError(f"unknown take {take!r}; choose one of {', '.join(SWAP_TAKES)}")
    student_state = _state_dict(student, "student")
    pairs = _layer_pairs(teacher, student_state, layers, progress, f"swap {take}")
    swapped = {name: swap_weight(w_teacher, w_student, take) for name, w_teacher, w_student in pairs}
    return {
        name: swapped[name] if name in swapped else tensor.detach().clone() for name, tensor in student_state.items()
    }
