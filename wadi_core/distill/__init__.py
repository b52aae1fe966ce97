"""One-step VSD distillation (DESIGN.md §4 "VSD", WADI_PAPER.md §4): the objective as pure functions
(:mod:`.losses`) and the run configuration (:mod:`.config`)."""

from .config import MIXED_PRECISION, VSDConfig
from .losses import (
    GENERATOR_REDUCTIONS,
    NULL_DROPOUT_MODES,
    cfg_epsilon,
    fake_score_loss,
    generator_loss,
    one_step_x0,
    timestep_bounds,
)

__all__ = [
    "GENERATOR_REDUCTIONS",
    "MIXED_PRECISION",
    "NULL_DROPOUT_MODES",
    "VSDConfig",
    "cfg_epsilon",
    "fake_score_loss",
    "generator_loss",
    "one_step_x0",
    "timestep_bounds",
]

from .vsd import VSDResult, checkpoint_path, latest_checkpoint, train_vsd  # noqa: E402

__all__ += ["VSDResult", "checkpoint_path", "latest_checkpoint", "train_vsd"]
