"""Configuration of the VSD distillation loop (WaDi §3.3; ``docs/paper_notes.md#vsd-training``).

Defaults are the paper's values (``train_dkd_sd1.5.sh`` and ``train_dkd_sd.py``'s argument defaults,
``docs/paper_notes.md#training-hyper-parameters``) except the runtime settings (precision, optimizer, gradient
checkpointing), which default to what runs on a CPU; :meth:`VSDConfig.official` is the whole official recipe of
each backbone. Every deviation from the official loop that the tiny world
may need (fake-score warm-up, fake:generator update ratio, gradient normalisation, EMA, loss reduction, dropout
mode, the fake score's guidance, DMD's regression loss) is a named field whose paper-faithful value is the default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..adapters import METHODS
from .losses import GENERATOR_REDUCTIONS, NULL_DROPOUT_MODES

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw_8bit")
REGRESSION_TEACHER_STEPS = 25  # DDIM steps of the teacher pairs of DMD's regression loss (the tiny teacher's sampler)
# Fields added after the tiny-world students were trained: an artifact key leaves them out while they hold their
# default (which is what those students were trained with), so the bundled students stay valid.
_KEYED_ONLY_OFF_DEFAULT = ("one_step_alpha_bar", "gradient_checkpointing", "optimizer", "fake_guidance_scale",
                           "regression_weight", "regression_pairs", "regression_teacher_steps",
                           "regression_warmup_steps")


@dataclass(frozen=True)
class VSDConfig:
    """One-step VSD student + fake score (WaDi: LoRaD for both). Hash-stable: frozen, plain fields only."""

    # Student: teacher weights + adapter at identity (adapters.METHODS; "full" = SwiftBrush-style fine-tune).
    student_method: str = "lorad"
    student_rank: int = 256  # paper: 256 on SD1.5/2.1, 128 on PixArt-α; ignored by "full"
    # Fake score: a second copy of the teacher with its own adapter (the "teacher_lora" of the official code).
    fake_method: str = "lorad"
    fake_rank: int = 32  # paper: 32 for every backbone
    # Objective (``train_dkd_sd.py``, docs/paper_notes.md#generator-loss).
    guidance_scale: float = 1.5  # CFG of both the real and the fake score in the generator loss
    t_min_fraction: float = 0.02  # generator t ~ U{⌊t_min·T⌋, …, ⌊t_max·T⌋−1} = {20, …, 980}
    t_max_fraction: float = 0.981
    fake_null_dropout: float = 0.1  # probability of the empty prompt in the fake-score loss
    fake_null_dropout_mode: str = "batch"  # "batch": whole batch at once (official); "sample": per sample (ours)
    generator_loss_reduction: str = "mean"  # "mean": official 0.5·MSE; "sum_pixels": ours (see losses.py)
    # Optimisation (AdamW, β = (0.9, 0.999), wd 0, constant LR, no warm-up in the paper).
    student_lr: float = 1e-4
    fake_lr: float = 1e-2
    batch_size: int = 128  # global batch (paper: 8 GPUs × 16)
    steps: int = 22_200  # generator steps (paper: 2 epochs of 1,418,723 prompts at batch 128 ≈ 22.2k)
    grad_clip: float = 1.0  # max gradient norm, for the student and the fake score separately
    optimizer: str = "adamw"  # "adamw_8bit": bitsandbytes' AdamW8bit, the official choice (needs a GPU)
    # ᾱ of the one-step formula x0 = (z − √(1−ᾱ)·ε̂)/√ᾱ. None: the scheduler's ᾱ_{T−1} (SD1.5: 0.00466). The
    # official scripts hard-code 0.0047 for SD and PixArt alike, although PixArt's schedule gives about 4e-5
    # (docs/paper_notes.md#pixart-one-step-alpha); the paper profile sets 0.0047 for PixArt.
    one_step_alpha_bar: float | None = None
    ema_decay: float | None = None  # θ-EMA of the student; None = off (paper default), optional 0.999
    # Deviations from the official loop (paper-faithful values are the defaults).
    fake_warmup_steps: int = 0  # fake-score-only steps before the first VSD step (after any regression warm-up)
    fake_updates_per_step: int = 1  # fake-score updates per generator step (official: 1:1)
    normalize_generator_grad: bool = False  # DMD-style per-sample normalisation of g_t (official: off)
    # CFG of the fake score in the generator loss; None: guidance_scale, as the official code guides both scores.
    # 1.0 leaves the fake score unguided, as DMD does, so that the student is pulled toward the guided teacher.
    fake_guidance_scale: float | None = None
    # DMD's regression loss (Yin et al. 2024, ours), added to the generator loss: regression_weight ·
    # MSE(x0(z, c), x0_teacher(z, c)) on a batch of `batch_size` of `regression_pairs` (noise, prompt, teacher x0)
    # triples, the teacher's DDIM samples of `regression_teacher_steps` steps at `guidance_scale`. 0: off (official).
    regression_weight: float = 0.0
    regression_pairs: int = 0
    regression_teacher_steps: int = REGRESSION_TEACHER_STEPS
    # Generator steps, counted in `steps`, at the start of the run that take the regression loss alone (MSE on the
    # same pairs; no generator loss, no fake-score update), so that VSD starts from a student fitted to the
    # teacher's samples instead of from the teacher (ours). The fake-score warm-up then runs after them; the
    # student's AdamW moments and θ-EMA carry on from the warm-up into VSD.
    regression_warmup_steps: int = 0
    # Runtime.
    seed: int = 0  # the official scripts use seed None (non-deterministic); ours is always fixed
    mixed_precision: str = "no"  # accelerate's setting; paper: "fp16" (SD), "bf16" (PixArt); "no" on CPU
    gradient_checkpointing: bool = False  # of the student and the fake score (the official scripts: on)
    checkpoint_every: int = 500  # generator steps between checkpoints (ours: the official θ save never fires)

    def __post_init__(self) -> None:
        for name in ("student_method", "fake_method"):
            value = getattr(self, name)
            if value not in METHODS:
                raise ValueError(
                    f"VSDConfig.{name}: unknown adapter method {value!r}; choose one of {', '.join(METHODS)}"
                )
        for name in ("student_rank", "fake_rank", "batch_size", "checkpoint_every", "fake_updates_per_step",
                     "regression_teacher_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VSDConfig.{name}: must be a positive integer, got {value!r}")
        for name in ("steps", "fake_warmup_steps", "regression_pairs", "regression_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VSDConfig.{name}: must be a non-negative integer, got {value!r}")
        if not 0.0 <= self.t_min_fraction < self.t_max_fraction <= 1.0:
            raise ValueError(
                f"VSDConfig.t_min_fraction/t_max_fraction: need 0 ≤ t_min_fraction < t_max_fraction ≤ 1, "
                f"got t_min_fraction={self.t_min_fraction}, t_max_fraction={self.t_max_fraction}"
            )
        for name in ("student_lr", "fake_lr", "grad_clip"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"VSDConfig.{name}: must be > 0, got {value!r}")
        if not self.guidance_scale > 0:
            raise ValueError(f"VSDConfig.guidance_scale: must be > 0, got {self.guidance_scale!r}")
        if self.fake_guidance_scale is not None and not self.fake_guidance_scale > 0:
            raise ValueError(f"VSDConfig.fake_guidance_scale: must be None (= guidance_scale) or > 0, "
                             f"got {self.fake_guidance_scale!r}")
        if isinstance(self.regression_weight, bool) or not 0 <= self.regression_weight < math.inf:
            raise ValueError(f"VSDConfig.regression_weight: must be a finite number ≥ 0 (0: off), "
                             f"got {self.regression_weight!r}")
        uses_pairs = self.regression_weight > 0 or self.regression_warmup_steps > 0
        if uses_pairs != (self.regression_pairs > 0):
            raise ValueError(f"VSDConfig.regression_weight={self.regression_weight}, regression_warmup_steps="
                             f"{self.regression_warmup_steps} and regression_pairs={self.regression_pairs}: the "
                             "regression loss or warm-up needs regression_pairs > 0, and pairs need one of them")
        if 0 < self.steps <= self.regression_warmup_steps:
            raise ValueError(f"VSDConfig.regression_warmup_steps={self.regression_warmup_steps} leaves no VSD step of "
                             f"steps={self.steps}; the warm-up counts in steps")
        if self.regression_pairs == 0 and self.regression_teacher_steps != REGRESSION_TEACHER_STEPS:
            raise ValueError(f"VSDConfig.regression_teacher_steps={self.regression_teacher_steps}: used only with "
                             "regression_pairs > 0")
        if not 0.0 <= self.fake_null_dropout <= 1.0:
            raise ValueError(f"VSDConfig.fake_null_dropout: must lie in [0, 1], got {self.fake_null_dropout!r}")
        if self.fake_null_dropout_mode not in NULL_DROPOUT_MODES:
            raise ValueError(
                f"VSDConfig.fake_null_dropout_mode: {self.fake_null_dropout_mode!r} not in "
                f"{', '.join(NULL_DROPOUT_MODES)}"
            )
        if self.generator_loss_reduction not in GENERATOR_REDUCTIONS:
            raise ValueError(
                f"VSDConfig.generator_loss_reduction: {self.generator_loss_reduction!r} not in "
                f"{', '.join(GENERATOR_REDUCTIONS)}"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"VSDConfig.ema_decay: must be None (off) or lie in (0, 1), got {self.ema_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"VSDConfig.optimizer: {self.optimizer!r} not in {', '.join(OPTIMIZERS)}")
        if self.one_step_alpha_bar is not None and not 0.0 < self.one_step_alpha_bar < 1.0:
            raise ValueError(
                f"VSDConfig.one_step_alpha_bar: must be None or lie in (0, 1), got {self.one_step_alpha_bar!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"VSDConfig.mixed_precision: {self.mixed_precision!r} not in {', '.join(MIXED_PRECISION)}"
            )

    @classmethod
    def official(cls, backbone: str = "sd15") -> VSDConfig:
        """The official scripts' whole recipe (``train_dkd_sd1.5.sh``, ``train_dkd_sd2.1.sh``,
        ``train_dkd_pixart.sh``), runtime included: fp16 (bf16 for PixArt-α), 8-bit AdamW, gradient
        checkpointing, and for PixArt-α student rank 128 and the hard-coded one-step ᾱ of 0.0047. For SD the
        one-step ᾱ stays the scheduler's (0.00466, where the scripts round it to 0.0047;
        docs/paper_notes.md#one-step-sample). The field defaults differ only in the runtime settings, which
        must run on a CPU too."""
        if backbone not in ("sd15", "sd21-base", "pixart-alpha-256"):
            raise ValueError(f"no official recipe for {backbone!r}; choose sd15, sd21-base or pixart-alpha-256")
        pixart = backbone == "pixart-alpha-256"
        return cls(student_rank=128 if pixart else 256, mixed_precision="bf16" if pixart else "fp16",
                   optimizer="adamw_8bit", gradient_checkpointing=True,
                   one_step_alpha_bar=0.0047 if pixart else None)

    @property
    def t_range(self) -> tuple[float, float]:
        """(t_min_fraction, t_max_fraction), the ``t_range`` argument of :func:`~.losses.generator_loss`."""
        return (self.t_min_fraction, self.t_max_fraction)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict:
        """:meth:`to_dict` for artifact keys: fields added later are left out while they hold their default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in self.to_dict().items() if k not in _KEYED_ONLY_OFF_DEFAULT or v != defaults[k]}
