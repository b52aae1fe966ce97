"""Weight-change analysis of a one-step student against its teacher (WaDi Fig. 1(a)–(c)).

:mod:`.weights` holds the per-tensor maths (:func:`row_changes`, :func:`direction_residual`,
:func:`cumulative_energy`, :func:`swap_weight`) and the model-level loops over layers: :func:`weight_changes`
(Fig. 1(a)), :func:`summarize_changes` (its all-layer means), :func:`residual_energy` (Fig. 1(b)) and
:func:`swap` (the norm / direction replacement of Fig. 1(c)).
"""

from .weights import (
    CHANGE_COLUMNS,
    ENERGY_COLUMNS,
    SWAP_TAKES,
    cumulative_energy,
    direction_residual,
    layer_kind,
    rank_k,
    residual_energy,
    row_changes,
    select_weights,
    summarize_changes,
    swap,
    swap_weight,
    weight_changes,
)

__all__ = [
    "CHANGE_COLUMNS",
    "ENERGY_COLUMNS",
    "SWAP_TAKES",
    "cumulative_energy",
    "direction_residual",
    "layer_kind",
    "rank_k",
    "residual_energy",
    "row_changes",
    "select_weights",
    "summarize_changes",
    "swap",
    "swap_weight",
    "weight_changes",
]
