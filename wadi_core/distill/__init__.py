"""One-step VSD distillation (DESIGN.md §4 "VSD", WADI_PAPER.md §4): the objective as pure functions
(:mod:`.losses`), the run configuration (:mod:`.config`), the loop (:mod:`.vsd`) and the cached tiny-world
students (:mod:`.students`)."""

from ..diffusion import one_step_x0
from .config import MIXED_PRECISION, VSDConfig
from .losses import (
    GENERATOR_REDUCTIONS,
    NULL_DROPOUT_MODES,
    cfg_epsilon,
    fake_score_loss,
    generator_loss,
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

from .students import (  # noqa: E402
    STUDENT_METHODS,
    deviation_study,
    export_student,
    load_or_train_student,
    one_step_generate,
    prompt_embeddings,
    student_config,
)

__all__ += ["STUDENT_METHODS", "deviation_study", "export_student", "load_or_train_student", "one_step_generate",
            "prompt_embeddings", "student_config"]
