"""One-step VSD distillation (WaDi §3.3): the objective as pure functions (:mod:`.losses`), the run configuration
(:mod:`.config`), the loop and its pieces (:mod:`.vsd`), what it trains on (:mod:`.training_data`), the cached
tiny-world students (:mod:`.students`) and the fair comparison of methods: one lr sweep for all, several seeds
(:mod:`.studies`)."""

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

from .vsd import (  # noqa: E402
    PromptEncoder,
    VSDResult,
    VSDState,
    build_vsd,
    checkpoint_path,
    latest_checkpoint,
    resume_vsd,
    save_vsd_checkpoint,
    train_vsd,
    vsd_step,
)

__all__ += ["PromptEncoder", "VSDResult", "VSDState", "build_vsd", "checkpoint_path", "latest_checkpoint",
            "resume_vsd", "save_vsd_checkpoint", "train_vsd", "vsd_step"]

from .students import (  # noqa: E402
    STUDENT_METHODS,
    deviation_study,
    distill,
    export_student,
    load_or_train_student,
    one_step_generate,
    one_step_scheduler_config,
    recipe_search,
    recipe_stages,
    student_config,
)

__all__ += ["STUDENT_METHODS", "deviation_study", "distill", "export_student", "load_or_train_student",
            "one_step_generate", "one_step_scheduler_config", "recipe_search", "recipe_stages",
            "student_config"]

from .studies import (  # noqa: E402
    best_lrs,
    beyond_spread,
    lr_sweep,
    mean_spread,
    recipe_study,
    record_key,
    record_path,
    regression_ceiling,
    seed_comparison,
    seed_runs,
    seed_summary,
    student_scores,
    sweep_config,
    sweep_point,
    variant_seed_runs,
    world_recipes,
    world_study,
)

__all__ += ["beyond_spread", "best_lrs", "lr_sweep", "mean_spread", "recipe_study", "record_key", "record_path",
            "regression_ceiling", "seed_comparison", "seed_runs", "seed_summary", "student_scores", "sweep_config",
            "sweep_point", "variant_seed_runs", "world_recipes", "world_study"]

from .training_data import pair_x0_error, prompt_embeddings, teacher_pairs  # noqa: E402

__all__ += ["pair_x0_error", "prompt_embeddings", "teacher_pairs"]
