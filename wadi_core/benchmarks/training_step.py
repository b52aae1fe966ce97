"""What a VSD training step and a one-step student cost in the tiny world (WaDi §3.3, §3.2).

``python -m wadi_core.benchmarks training-step`` times one WaDi generator step, :func:`wadi_core.distill.vsd_step`
(the function the training loop runs, so the measurement cannot drift from the loop), for every student method
and for a LoRaD student built the official way (``register_hooks`` / ``hook_fn`` of ``train_dkd_sd.py``: every
adapted Linear runs twice and keeps W', cos, sin for backward). Beside it: the student's own forward+backward and
the bytes autograd keeps for backward in the student's forward (:func:`~.measure.saved_for_backward_bytes`,
parameters excluded), the part of a step's peak that grows with the adapter's implementation. Measured, never
asserted; medians of :func:`~.measure.time_ms`.

Table: ``results/tables/benchmarks_training_step.{csv,md,tex}`` (``--quick``: ``*_quick``).
"""

from __future__ import annotations

import argparse
import copy
from functools import partial
from typing import Mapping

import pandas as pd
import torch
from torch import nn

from ..adapters import count_trainable, select_layers
from ..adapters.official_hook import OfficialHookLoRaD
from ..diffusion import one_step_x0
from ..distill.config import VSDConfig
from ..distill.vsd import VSDState, build_vsd, sample_batch, vsd_step
from ..reporting import save_table
from .measure import environment_header, saved_for_backward_bytes, time_ms

OFFICIAL_HOOK = "lorad_official_hook"  # the row of the LoRaD student adapted the official way


def inject_official_hook(model: nn.Module, rank: int, rule: str = "student") -> list[str]:
    """Adapt ``model`` in place the official way: every Linear of ``rule`` becomes an
    :class:`~wadi_core.adapters.official_hook.OfficialHookLoRaD` (``theta_a``/``theta_b`` + the forward hook), every
    other parameter is frozen. Returns the adapted names, as :func:`wadi_core.adapters.inject` does."""
    model.requires_grad_(False)
    names = select_layers(model, rule)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, OfficialHookLoRaD(getattr(parent, child), rank))
    return names


def official_hook_student(teacher: nn.Module, rank: int) -> nn.Module:
    """A teacher copy adapted by :func:`inject_official_hook` on the student rule."""
    student = copy.deepcopy(teacher)
    inject_official_hook(student, rank)
    return student


def training_step_costs(
    teacher: nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    null_embed: torch.Tensor,
    students: Mapping[str, tuple[VSDConfig, bool]],
    repeats: int = 5,
    warmup: int = 2,
) -> pd.DataFrame:
    """Median seconds of one :func:`~wadi_core.distill.vsd_step` (student one-step forward, real/fake CFG scores,
    student backward + clipping + AdamW, ``fake_updates_per_step`` fake-score updates) and of the student's
    forward+backward alone, the student forward's saved-for-backward MiB and its trainable parameters, per student.

    Args:
        teacher, scheduler, prompt_embeds, null_embed: as for :func:`~wadi_core.distill.build_vsd` (``teacher`` is
            frozen, as the training loop freezes it).
        students: ``{name: (config, official_hook)}``; each run is set up by :func:`~wadi_core.distill.build_vsd`
            from its config (the student is ``config.student_method`` at ``config.student_rank``;
            ``official_hook=True`` builds a LoRaD student the official way instead).
        repeats, warmup: timed and untimed rounds; every round runs each student's step and forward+backward once
            (interleaved, so a burst of load from other processes slows every student alike).

    Returns:
        One row per student (index ``student``): step_s, student_fwd_bwd_s, student_saved_MiB, trainable. The
        caller's global RNG is left as it was.
    """
    for name, (config, official_hook) in students.items():
        if official_hook and config.student_method != "lorad":
            raise ValueError(f"{name}: official_hook=True needs student_method 'lorad', got {config.student_method!r}")
    with torch.random.fork_rng(devices=[]):
        states = {}
        for name, (config, official_hook) in students.items():
            torch.manual_seed(config.seed)
            student = official_hook_student(teacher, config.student_rank) if official_hook else None
            states[name] = build_vsd(teacher, scheduler, prompt_embeds, null_embed, config, student=student)
        calls = {}
        for name, state in states.items():
            calls[f"{name}: step"] = partial(vsd_step, state)
            calls[f"{name}: student"] = partial(_student_forward_backward, state)
        ms = time_ms(calls, repeats, warmup)
        rows = {name: {"step_s": ms[f"{name}: step"] / 1e3, "student_fwd_bwd_s": ms[f"{name}: student"] / 1e3,
                       "student_saved_MiB": _student_saved_bytes(state) / 2**20,
                       "trainable": count_trainable(state.student)}
                for name, state in states.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("student")


def _student_forward_backward(state: VSDState) -> None:
    cond, z = sample_batch(state)
    one_step_x0(state.student, z, cond, state.scheduler).sum().backward()
    state.opt_student.zero_grad(set_to_none=True)


def _student_saved_bytes(state: VSDState) -> int:
    cond, z = sample_batch(state)
    student = state.student
    saved = saved_for_backward_bytes(lambda: one_step_x0(student, z, cond, state.scheduler),
                                     [*student.parameters(), *student.buffers(), z, cond])
    state.opt_student.zero_grad(set_to_none=True)
    return saved


@torch.no_grad()
def unet_call_seconds(unets: Mapping[str, nn.Module], prompt_embeds: torch.Tensor, batch_size: int,
                      repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Median seconds of one call of each U-Net on the same ``batch_size`` noisy inputs (t = T−1, no CFG), the
    calls interleaved after one untimed round (:func:`~.measure.time_ms`), so the ratios between the U-Nets hold
    under load: what a one-step student costs at inference. The U-Nets share one input shape."""
    shapes = {(unet.config.in_channels, unet.config.sample_size) for unet in unets.values()}
    if len(shapes) != 1:
        raise ValueError(f"the U-Nets take different inputs (channels, size): {sorted(shapes)}")
    (channels, size), = shapes
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, channels, size, size, generator=generator)
    cond = prompt_embeds[:batch_size]
    t = torch.full((batch_size,), 999, dtype=torch.long)
    calls = {name: (lambda unet=unet: unet(z, t, encoder_hidden_states=cond)) for name, unet in unets.items()}
    return {name: ms / 1e3 for name, ms in time_ms(calls, repeats).items()}


def run_training_step_benchmark(profile_name: str = "tiny", repeats: int = 5, warmup: int = 2,
                                prompts: int | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """:func:`training_step_costs` of the official-hook LoRaD student and of every student method of
    ``profile_name``'s recipe, on its backbone (``load_backbone(profile.backbone)``) and the training split's
    captions (the setting of notebook 03). ``prompts`` keeps the first prompts only and ``batch_size`` overrides
    the recipe's (quick runs).

    Returns one row per student (index: ``lorad_official_hook`` then :data:`~wadi_core.distill.STUDENT_METHODS`).
    """
    from ..backbones import load_backbone
    from ..distill import STUDENT_METHODS, prompt_embeddings, student_config
    from ..profiles import get_profile
    from ..world import make_split

    profile = get_profile(profile_name)
    backbone = load_backbone(profile.backbone)
    captions = sorted(set(make_split("train", profile.world).captions))[:prompts]
    embeds = prompt_embeddings(backbone, captions)
    overrides = {} if batch_size is None else {"batch_size": batch_size}
    students = {OFFICIAL_HOOK: (student_config(profile.distill, "lorad", **overrides), True)}
    students.update({m: (student_config(profile.distill, m, **overrides), False) for m in STUDENT_METHODS})
    return training_step_costs(backbone.denoiser, backbone.scheduler, embeds, backbone.null_embedding(), students,
                               repeats, warmup)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks training-step``."""
    parser.add_argument("--profile", default="tiny", help="profile whose recipe and bundled teacher are used")
    parser.add_argument("--repeats", type=int, help="timed steps per student, median reported (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; quick 0)")
    parser.add_argument("--quick", action="store_true", help="64 prompts, batch 2, one step; table *_quick")


def main(args: argparse.Namespace) -> int:
    """Run the training-step benchmark, print and save its table."""
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    sizes = {"prompts": 64, "batch_size": 2} if args.quick else {}
    header = f"{environment_header()}; profile {args.profile}, median of {repeats}"
    print(header)
    table = run_training_step_benchmark(args.profile, repeats, warmup, **sizes)
    print(table.to_string(float_format="{:.4g}".format))
    stem = "benchmarks_training_step_quick" if args.quick else "benchmarks_training_step"
    save_table(table, stem, caption=f"One WaDi generator step per student ({header})")
    return 0
