"""The VSD distillation loop of WaDi (§3.3; the training loop of the official ``train_dkd_sd.py``): one-step
student, frozen real score, trainable fake score, with accelerate, per-step CSV log, atomic checkpoints and exact
resume (``docs/paper_notes.md#vsd-training``).

Typical use::

    result = train_vsd(teacher_unet, scheduler, prompt_embeds, null_embed, VSDConfig(...), "runs/wadi")
    result.student      # the one-step student (adapters not merged)
    result.log          # one row per generator step

:func:`train_vsd` is four pieces that can be called on their own (the training-step benchmark times
:func:`vsd_step`, the very step the loop runs): :func:`build_vsd` sets up a :class:`VSDState` (student, fake
score, optimizers, accelerate, the loop's generator), :func:`resume_vsd` restores it from the latest checkpoint,
:func:`vsd_step` runs one generator step with its fake-score updates, :func:`save_vsd_checkpoint` writes it.

Determinism: every random draw of the loop (prompt indices, z, the losses' t/ε/dropout) goes through one CPU
``torch.Generator`` seeded with ``config.seed`` (plus the process index under ``accelerate launch``); adapter
initialisation uses the global CPU RNG, which :func:`build_vsd` seeds with ``config.seed`` (:func:`train_vsd`
runs inside a forked RNG scope, so the caller's global RNG is untouched). Order of draws per generator step:
prompt indices (B,), z (B, C, H, W), the generator loss (t, ε), the regression pairs' indices (B,) when
``regression_weight`` > 0, then for each fake update the fake-score loss (t, ε, dropout); a regression warm-up
step (``regression_warmup_steps``) draws the pairs' indices (B,) alone. A checkpoint stores
the trainable parameters, both optimizers' states, the CPU RNG state and the loop generator's state, so that on
CPU an interrupted run resumed to the end equals the uninterrupted run bitwise.

Checkpoint format (safetensors, no pickle): tensors ``student.<param>``, ``fake.<param>``,
``optim.student.<i>.<key>``, ``optim.fake.<i>.<key>`` (AdamW state of the i-th trainable parameter),
``ema.<param>`` (the student's θ-EMA, when ``ema_decay`` is set),
``rng.torch_cpu`` and ``rng.generator`` (uint8); metadata ``format``, ``step``, ``config`` (JSON),
``config_hash``, and ``regression_pairs`` (a digest of the pairs, when the config uses them: a resume on other
pairs is refused).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..adapters import inject
from ..artifacts import atomic_path, canonical_json, config_hash, tensor_digest
from ..diffusion import one_step_x0
from .config import VSDConfig
from .losses import fake_score_loss, generator_loss
from .training_data import pair_x0_error

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_FORMAT = "wadi-vsd-checkpoint"
_BAR_VALUES = {"g": "generator_loss", "reg": "regression_loss", "fake": "fake_loss"}  # the progress bar's, if set
LOG_NAME = "log.csv"
LOG_COLUMNS = ("step", "generator_loss", "regression_loss", "fake_loss", "student_grad_norm", "fake_grad_norm",
               "seconds")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")
# Fields that may differ between a run and its resumption (they change where it stops, not what it computes).
_RESUMABLE_CHANGES = ("steps", "checkpoint_every")


class PromptEncoder:
    """Training prompts encoded when a step draws them (``encode(prompts) -> (B, L, D)``), indexed like the cached
    (N, L, D) tensor: ``len()`` is N and ``[indices]`` the conditioning of those prompts, on the CPU."""

    def __init__(self, prompts: list[str], encode):
        self.prompts, self.encode = list(prompts), encode

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encode([self.prompts[i] for i in index.tolist()]).detach().cpu()


@dataclass
class VSDState:
    """A VSD run between generator steps: built by :func:`build_vsd`, advanced by :func:`vsd_step`."""

    config: VSDConfig
    scheduler: DDPMScheduler
    accelerator: Accelerator
    student: nn.Module  # the one-step student as accelerate prepared it
    fake: nn.Module  # the fake score as accelerate prepared it
    real: nn.Module  # the frozen teacher (the real score)
    raw_student: nn.Module  # ``student`` and ``fake`` unwrapped: the modules whose parameters are trained
    raw_fake: nn.Module
    opt_student: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    generator: torch.Generator  # the loop's CPU generator: every random draw of a step
    prompt_embeds: torch.Tensor | PromptEncoder  # (N, L, D) on the CPU, or encoded batch by batch
    null: torch.Tensor  # (1, L, D) empty-prompt states on the training device
    latent_shape: tuple[int, ...]  # (C, H, W) of z
    per_process_batch: int
    ema: dict[str, torch.Tensor] | None  # the student's θ-EMA (fp32, on the training device) or None
    pairs: dict[str, torch.Tensor] | None  # DMD's regression pairs {"z", "cond", "targets"} on the CPU, or None
    pairs_digest: str | None  # :func:`_pairs_digest` of ``pairs``, kept in each checkpoint
    step: int = 0  # generator steps done
    last_checkpoint: Path | None = None  # the latest checkpoint written or resumed from


@dataclass
class VSDResult:
    """What :func:`train_vsd` returns."""

    student: nn.Module  # one-step student (teacher + adapter, unmerged), on the training device
    fake: nn.Module  # fake score (teacher + adapter)
    ema_student: nn.Module | None  # the student with its θ-EMA parameters (``ema_decay`` set), else None
    log: pd.DataFrame  # one row per generator step, columns LOG_COLUMNS
    steps_done: int  # generator steps completed (all runs together)
    resumed_from: int | None  # step of the checkpoint this call started from; None for a fresh run


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}.safetensors"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``out_dir``; None when there is none."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{prefix}.{index}.{key}": torch.as_tensor(value) for index, entry in state.items()
            for key, value in entry.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _write_checkpoint(path: Path, state: VSDState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"student.{n}": p.detach() for n, p in _trainable(state.raw_student).items()})
    tensors.update({f"ema.{n}": v for n, v in (state.ema or {}).items()})
    tensors.update({f"fake.{n}": p.detach() for n, p in _trainable(state.raw_fake).items()})
    tensors.update(_optimizer_tensors(state.opt_student, "optim.student"))
    tensors.update(_optimizer_tensors(state.opt_fake, "optim.fake"))
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    tensors["rng.generator"] = state.generator.get_state()
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(state.step), "config": canonical_json(state.config),
                "config_hash": config_hash(state.config)}
    if state.pairs_digest is not None:
        metadata["regression_pairs"] = state.pairs_digest
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a VSD checkpoint (format {metadata.get('format')!r})")
    return load_file(str(path)), metadata


def _pairs_digest(pairs: dict[str, torch.Tensor]) -> str:
    """One digest of the regression pairs' noise, text states and teacher samples."""
    return "-".join(tensor_digest(pairs[name].float()) for name in ("z", "cond", "targets"))  # bf16 has no numpy


def _check_same_pairs(path: Path, metadata: dict[str, str], pairs_digest: str | None) -> None:
    # A checkpoint written before the digest was kept has none: its pairs cannot be checked.
    saved = metadata.get("regression_pairs")
    if saved is not None and saved != pairs_digest:
        raise ValueError(f"cannot resume from {path}: it was trained on other regression pairs (digest {saved} vs "
                         f"now {pairs_digest}), e.g. sampled again on another machine; resume with the same pairs "
                         "or use another out_dir")


def _check_same_run(path: Path, metadata: dict[str, str], config: VSDConfig) -> None:
    # A field added to VSDConfig after the checkpoint was written counts as its default there.
    defaults = json.loads(canonical_json(VSDConfig()))
    saved = {**defaults, **json.loads(metadata["config"])}
    current = json.loads(canonical_json(config))
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ)
        raise ValueError(f"cannot resume from {path}: it was written with a different VSDConfig ({details}); "
                         "use another out_dir or the original config")


def _load_params(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    params = _trainable(model)
    saved = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{path}: {prefix} parameters do not match the model (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


# ----------------------------------------------------------------------------------------------------------------
# Log
# ----------------------------------------------------------------------------------------------------------------


def _prepare_log(path: Path, keep_until: int) -> None:
    """Keep only rows with step ≤ ``keep_until`` (rows past the resumed checkpoint are recomputed)."""
    rows = []
    if path.exists():
        with path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("step") and int(r["step"]) <= keep_until]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in LOG_COLUMNS} for r in rows)


def _append_log(path: Path, row: dict) -> None:
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=LOG_COLUMNS).writerow(row)
        handle.flush()


def _fmt(value: float) -> str:
    return repr(float(value))  # shortest round-trip text: the CSV holds the exact float


# ----------------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------------


def _check_finite(value: torch.Tensor, what: str, where: str, last_checkpoint: Path | None) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
            "no checkpoint was written yet"
        raise RuntimeError(f"VSD training stopped at {where}: non-finite {what} ({number}); nothing was updated "
                           f"at this step and {kept}. Lower the learning rates or check the teacher/prompts.")
    return number


def _optimizer(config: VSDConfig, params, lr: float) -> torch.optim.Optimizer:
    """AdamW (β = (0.9, 0.999), weight decay 0), or bitsandbytes' AdamW8bit for ``optimizer="adamw_8bit"``."""
    params = list(params)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        import bitsandbytes
    except ImportError as err:
        raise RuntimeError("VSDConfig.optimizer='adamw_8bit' needs bitsandbytes (pip install bitsandbytes, on a GPU "
                           "machine); or use optimizer='adamw'") from err
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)


def build_vsd(
    teacher_unet: nn.Module,
    scheduler: DDPMScheduler,
    prompt_embeds: torch.Tensor,
    null_embed: torch.Tensor,
    config: VSDConfig,
    student: nn.Module | None = None,
    regression_pairs: dict[str, torch.Tensor] | None = None,
) -> VSDState:
    """Student, fake score, optimizers and accelerate for a fresh run (step 0); seeds the global CPU RNG.

    Args:
        teacher_unet: the frozen real score (an SD ``UNet2DConditionModel`` or a PixArt transformer, in latent or
            pixel space); copied for the student and the fake score, and itself set to ``requires_grad_(False)``.
        scheduler: the teacher's DDPM scheduler (ᾱ for the one-step formula and the losses).
        prompt_embeds: (N, L, D) cached text states of the training prompts, or a :class:`PromptEncoder` that
            encodes the B prompts a step samples (the official ``dataset.py`` encodes on the fly: 1.4M SD prompts
            would take 330 GB as one tensor).
        null_embed: (1, L, D) or (L, D) states of the empty prompt (CFG's unconditional branch).
        config: the run's :class:`VSDConfig`.
        student: an already adapted student to train instead of the default, a copy of the teacher with
            ``config.student_method`` at ``config.student_rank`` (e.g. LoRaD through the official forward hook,
            for the training-step benchmark).
        regression_pairs: ``{"z", "cond", "targets"}``, ``config.regression_pairs`` (noise (N, C, H, W), text
            states (N, L, D), teacher x0 (N, C, H, W)) triples of DMD's regression loss
            (:func:`~.training_data.teacher_pairs`); needed exactly when ``config.regression_pairs`` > 0.

    Raises:
        ValueError: bad shapes, or regression pairs missing, superfluous or of another count than the config's.
    """
    from accelerate import Accelerator

    if isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be (N, L, D), got shape {tuple(prompt_embeds.shape)}")
    torch.manual_seed(config.seed)
    # (1) Student: teacher weights + adapter at identity ("full": every parameter trainable), as `register_hooks`
    #     adapts the official student (WaDi §3.2).
    if student is None:
        student = copy.deepcopy(teacher_unet)
        inject(student, config.student_method, config.student_rank, "student")
    # (2) Fake score: a second copy with the fake-rule adapter (`register_hooks_teacher`, the official
    #     "teacher_lora"); the real score is the frozen teacher.
    fake = copy.deepcopy(teacher_unet)
    inject(fake, config.fake_method, config.fake_rank, "fake")
    real = teacher_unet.requires_grad_(False).eval()
    student.train()
    fake.train()

    if config.gradient_checkpointing:  # the official scripts' --gradient_checkpointing
        for model in (student, fake):
            model.enable_gradient_checkpointing()

    # (3) AdamW for each, constant LR, weight decay 0 (`train_dkd_sd.py` uses bitsandbytes' 8-bit AdamW with the
    #     same settings: ``optimizer="adamw_8bit"``); gradient clipping in the step.
    opt_student = _optimizer(config, _trainable(student).values(), config.student_lr)
    opt_fake = _optimizer(config, _trainable(fake).values(), config.fake_lr)

    # (4) accelerate: the same code on CPU, one GPU or `accelerate launch` over N GPUs (the official run: 8 × 16).
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    student, fake, opt_student, opt_fake = accelerator.prepare(student, fake, opt_student, opt_fake)
    real.to(device)
    raw_student, raw_fake = accelerator.unwrap_model(student), accelerator.unwrap_model(fake)
    size = raw_student.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    latent_shape = (raw_student.config.in_channels, *size)
    _check_regression_pairs(regression_pairs, config, latent_shape, tuple(null_embed.shape[-2:]))
    pairs = None if regression_pairs is None else {k: v.detach().cpu() for k, v in regression_pairs.items()}
    # θ-EMA of the student's trainable parameters (fp32, on the training device), updated after each step.
    ema = None if config.ema_decay is None else \
        {n: p.detach().float().clone() for n, p in _trainable(raw_student).items()}
    return VSDState(
        config=config, scheduler=scheduler, accelerator=accelerator, student=student, fake=fake, real=real,
        raw_student=raw_student, raw_fake=raw_fake, opt_student=opt_student, opt_fake=opt_fake,
        generator=torch.Generator(device="cpu").manual_seed(config.seed + accelerator.process_index),
        prompt_embeds=prompt_embeds.detach().to("cpu") if isinstance(prompt_embeds, torch.Tensor) else prompt_embeds,
        null=null_embed.reshape(1, *null_embed.shape[-2:]).to(device),
        latent_shape=latent_shape,
        per_process_batch=max(1, config.batch_size // accelerator.num_processes), ema=ema,
        pairs=pairs, pairs_digest=None if pairs is None else _pairs_digest(pairs),
    )


def _check_regression_pairs(pairs: dict[str, torch.Tensor] | None, config: VSDConfig,
                            latent_shape: tuple[int, ...], states_shape: tuple[int, ...]) -> None:
    if config.regression_pairs == 0:
        if pairs is not None:
            raise ValueError("regression pairs given but VSDConfig.regression_pairs is 0 (the loss and the "
                             "warm-up are off)")
        return
    if pairs is None or set(pairs) != {"z", "cond", "targets"}:
        raise ValueError(f"VSDConfig.regression_pairs={config.regression_pairs} needs regression pairs "
                         "{'z', 'cond', 'targets'} (wadi_core.distill.teacher_pairs)")
    shapes = {name: tuple(value.shape) for name, value in pairs.items()}
    expected = {"z": (config.regression_pairs, *latent_shape), "targets": (config.regression_pairs, *latent_shape),
                "cond": (config.regression_pairs, *states_shape)}
    if shapes != expected:
        raise ValueError(f"regression pairs: VSDConfig.regression_pairs={config.regression_pairs} and the student's "
                         f"sample shape {latent_shape} need shapes {expected}, got {shapes}")


def resume_vsd(state: VSDState, out_dir: str | Path) -> int | None:
    """(9) Resume from the latest checkpoint in ``out_dir``: parameters, optimizers, θ-EMA, RNG states, step.

    Returns the step resumed from; None (``state`` untouched) when ``out_dir`` holds no checkpoint. The official
    code's checkpoint hooks never fire (``docs/paper_notes.md#quirks-of-the-official-code``); this is ours.

    Raises:
        ValueError: the checkpoint was written with a different config (``steps``/``checkpoint_every`` aside) or
            on other regression pairs.
    """
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    tensors, metadata = _read_checkpoint(path)
    _check_same_run(path, metadata, state.config)
    _check_same_pairs(path, metadata, state.pairs_digest)
    _load_params(state.raw_student, tensors, "student", path)
    _load_params(state.raw_fake, tensors, "fake", path)
    _load_optimizer(state.opt_student, tensors, "optim.student")
    _load_optimizer(state.opt_fake, tensors, "optim.fake")
    if state.ema is not None:
        state.ema = {n: tensors[f"ema.{n}"].to(state.accelerator.device) for n in state.ema}
    torch.set_rng_state(tensors["rng.torch_cpu"])
    state.generator.set_state(tensors["rng.generator"])
    state.step, state.last_checkpoint = int(metadata["step"]), path
    return state.step


def sample_batch(state: VSDState) -> tuple[torch.Tensor, torch.Tensor]:
    """(5a) B prompt states and z ~ N(0, I), both drawn from the loop generator."""
    index = torch.randint(0, len(state.prompt_embeds), (state.per_process_batch,), generator=state.generator)
    z = torch.randn((state.per_process_batch, *state.latent_shape), generator=state.generator)
    device = state.accelerator.device
    return state.prompt_embeds[index].to(device), z.to(device)


def _regression_loss(state: VSDState) -> torch.Tensor:
    """(5c'') DMD's regression loss: MSE between the student's one-step x0 and the teacher's on B pairs drawn from
    the loop generator."""
    index = torch.randint(0, len(state.pairs["z"]), (state.per_process_batch,), generator=state.generator)
    return pair_x0_error(state.student, state.pairs, index, state.scheduler, state.config.one_step_alpha_bar,
                         state.accelerator.device)


def _fake_update(state: VSDState, x0: torch.Tensor, cond: torch.Tensor, where: str) -> tuple[float, float]:
    """(5d) One fake-score step on the student's detached samples."""
    config, accelerator = state.config, state.accelerator
    with accelerator.autocast():
        loss = fake_score_loss(state.fake, x0.detach(), cond, state.null, state.scheduler, state.generator,
                               null_dropout=config.fake_null_dropout, null_dropout_mode=config.fake_null_dropout_mode)
    value = _check_finite(loss, "fake-score loss", where, state.last_checkpoint)
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(list(_trainable(state.raw_fake).values()), config.grad_clip)
    state.opt_fake.step()
    state.opt_fake.zero_grad(set_to_none=True)
    return value, float(norm)


def _student_update(state: VSDState, loss: torch.Tensor) -> float:
    """Backward, clipped AdamW step and θ-EMA of the student; returns its gradient norm before clipping."""
    config = state.config
    state.accelerator.backward(loss)
    norm = state.accelerator.clip_grad_norm_(list(_trainable(state.raw_student).values()), config.grad_clip)
    state.opt_student.step()
    state.opt_student.zero_grad(set_to_none=True)
    if state.ema is not None:  # (5c') θ-EMA: ema ← d·ema + (1 − d)·θ
        with torch.no_grad():
            for name, param in _trainable(state.raw_student).items():
                state.ema[name].lerp_(param.detach().float(), 1.0 - config.ema_decay)
    return float(norm)


def _regression_warmup_step(state: VSDState, where: str) -> dict[str, float]:
    """(5') A regression warm-up step (``config.regression_warmup_steps``): the student alone, fitted to the
    teacher's pairs by their MSE; the real and fake scores are not called."""
    with state.accelerator.autocast():
        loss = _regression_loss(state)
    value = _check_finite(loss, "regression loss", where, state.last_checkpoint)
    s_norm = _student_update(state, loss)
    return {"generator_loss": math.nan, "regression_loss": value, "fake_loss": math.nan,
            "student_grad_norm": s_norm, "fake_grad_norm": math.nan}


def warm_up_fake(state: VSDState) -> None:
    """(5b) Optional fake-score warm-up before the first VSD generator step, after any regression warm-up
    (``config.fake_warmup_steps``; 0 in the official loop)."""
    steps = state.config.fake_warmup_steps
    for warm in range(steps):
        cond, z = sample_batch(state)
        with torch.no_grad(), state.accelerator.autocast():
            x0 = one_step_x0(state.student, z, cond, state.scheduler, state.config.one_step_alpha_bar)
        _fake_update(state, x0, cond, f"fake warm-up step {warm + 1}/{steps}")


def vsd_step(state: VSDState) -> dict[str, float]:
    """One generator step and its fake-score update(s), as the student step of ``train_dkd_sd.py`` (WaDi §3.3).

    Within ``config.regression_warmup_steps`` the step is a regression warm-up step instead (the student fitted to
    the teacher's pairs alone; generator and fake-score values NaN).

    Returns the values of the step's log row: generator_loss, regression_loss (NaN when off), fake_loss,
    student_grad_norm, fake_grad_norm.

    Raises:
        RuntimeError: a non-finite loss; nothing is updated at this step and the message names it.
    """
    config, accelerator = state.config, state.accelerator
    state.step += 1
    where = f"generator step {state.step}"
    if state.step <= config.regression_warmup_steps:
        return _regression_warmup_step(state, where)
    # (5a) Prompts, noise and the student's one-step sample x0 = (z − σ_T ε̂)/α_T.
    cond, z = sample_batch(state)
    with accelerator.autocast():
        x0 = one_step_x0(state.student, z, cond, state.scheduler, state.config.one_step_alpha_bar)
        # (5c) Generator update: ½‖x0 − sg(x0 − σ_t²(ε_real − ε_fake))‖², both scores with CFG.
        g_loss, _ = generator_loss(x0, state.real, state.fake, cond, state.null, state.scheduler,
                                   config.guidance_scale, state.generator, t_range=config.t_range,
                                   reduction=config.generator_loss_reduction,
                                   normalize=config.normalize_generator_grad,
                                   fake_guidance_scale=config.fake_guidance_scale)
        # (5c'') DMD's regression loss on the teacher's pairs, when on (not in the official loop).
        r_loss = _regression_loss(state) if config.regression_weight > 0 else None
    # (7) A non-finite loss stops before any update; the last checkpoint stays as it is.
    g_value = _check_finite(g_loss, "generator loss", where, state.last_checkpoint)
    r_value = math.nan if r_loss is None else _check_finite(r_loss, "regression loss", where, state.last_checkpoint)
    s_norm = _student_update(state, g_loss if r_loss is None else g_loss + config.regression_weight * r_loss)
    state.opt_fake.zero_grad(set_to_none=True)  # nothing should have reached it; keep it clean anyway
    # (5d) Fake-score update(s) on stopgrad(x0), fresh t/ε each.
    for _ in range(config.fake_updates_per_step):
        f_value, f_norm = _fake_update(state, x0, cond, where)
    return {"generator_loss": g_value, "regression_loss": r_value, "fake_loss": f_value,
            "student_grad_norm": s_norm, "fake_grad_norm": f_norm}


def save_vsd_checkpoint(state: VSDState, out_dir: str | Path) -> Path:
    """(8) Atomic checkpoint ``checkpoint-<step>.safetensors`` in ``out_dir``; only the latest is kept."""
    out_dir = Path(out_dir)
    path = checkpoint_path(out_dir, state.step)
    state.accelerator.wait_for_everyone()
    if state.accelerator.is_main_process:
        _write_checkpoint(path, state)
        for old in out_dir.glob("checkpoint-*.safetensors"):
            if old != path and _CHECKPOINT_RE.match(old.name):
                old.unlink()
    state.last_checkpoint = path
    return path


def train_vsd(
    teacher_unet: nn.Module,
    scheduler: DDPMScheduler,
    prompt_embeds: torch.Tensor,
    null_embed: torch.Tensor,
    config: VSDConfig,
    out_dir: str | Path,
    max_steps: int | None = None,
    progress: bool = True,
    regression_pairs: dict[str, torch.Tensor] | None = None,
) -> VSDResult:
    """Distil ``teacher_unet`` into a one-step student with VSD (WaDi §3.3), resuming from ``out_dir``.

    Args:
        teacher_unet, scheduler, prompt_embeds, null_embed, config: as for :func:`build_vsd`
            (``config.steps`` generator steps in total).
        out_dir: holds ``log.csv`` and the latest ``checkpoint-<step>.safetensors``; a checkpoint there is
            resumed (same config required, except ``steps``/``checkpoint_every``).
        max_steps: stop once this many generator steps are done in total (all runs together), writing a
            checkpoint there; None means ``config.steps``. For interrupting and resuming a run.
        progress: show a tqdm bar.
        regression_pairs: the teacher's pairs of DMD's regression loss, as for :func:`build_vsd`.

    Raises:
        RuntimeError: a non-finite loss; the message names the step, nothing is updated and the last
            checkpoint stays in ``out_dir``.
        ValueError: a checkpoint in ``out_dir`` from a different config, or bad inputs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    stop = config.steps if max_steps is None else min(int(max_steps), config.steps)

    with torch.random.fork_rng(devices=[]):  # the caller's global CPU RNG is left as it was
        state = build_vsd(teacher_unet, scheduler, prompt_embeds, null_embed, config,
                          regression_pairs=regression_pairs)  # (1)-(4)
        resumed_from = resume_vsd(state, out_dir)  # (9)
        main_process = state.accelerator.is_main_process
        if main_process:
            _prepare_log(log_path, keep_until=state.step)
        bar = tqdm(total=stop, initial=state.step, desc="VSD", disable=not progress or not main_process)
        while state.step < stop:
            if state.step == config.regression_warmup_steps:
                warm_up_fake(state)  # (5b) before the first VSD step: a checkpoint of that step precedes it
            began = time.perf_counter()
            values = vsd_step(state)  # (5a)-(5d), (7)
            seconds = time.perf_counter() - began
            # (6) Per-step log (appended and flushed: a crash loses at most the row being written).
            if main_process:
                _append_log(log_path, {"step": state.step, **{k: _fmt(v) for k, v in values.items()},
                                       "seconds": _fmt(seconds)})
            bar.update(1)
            bar.set_postfix({name: f"{values[column]:.3g}" for name, column in _BAR_VALUES.items()
                             if not math.isnan(values[column])})
            # (8) Atomic checkpoint every checkpoint_every steps and at the stop; keep only the latest.
            if state.step % config.checkpoint_every == 0 or state.step == stop:
                save_vsd_checkpoint(state, out_dir)
        bar.close()

    ema_student = None
    if state.ema is not None:
        ema_student = copy.deepcopy(state.raw_student).eval()
        with torch.no_grad():
            for name, param in _trainable(ema_student).items():
                param.copy_(state.ema[name])
    log = pd.read_csv(log_path) if log_path.exists() else pd.DataFrame(columns=LOG_COLUMNS)
    return VSDResult(student=state.raw_student, fake=state.raw_fake, ema_student=ema_student, log=log,
                     steps_done=state.step, resumed_from=resumed_from)
