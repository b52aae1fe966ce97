"""Three candidate tiny worlds at one CPU budget: what the teacher's training step and a WaDi generator step
(WaDi §3.3) cost in each, with random weights of the exact configs (no trained artifact is read).

``python -m wadi_core.benchmarks worlds`` builds the teacher U-Net (:func:`wadi_core.backbones.tiny.
teacher_unet_config`) of each world of :data:`WORLDS`:

- ``pixel``: the pixel teacher (:class:`~wadi_core.profiles.TeacherTrainConfig`) on 3×32×32 pixels,
  cross-attention only at 8×8 and in the mid block;
- ``pixel_sd15_attention``: the same pixels with SD1.5's attention pattern, the block types of
  :func:`~wadi_core.profiles.latent_teacher_config` (cross-attention at every level but the lowest, and mid);
- ``latent``: the latent tiny SD's teacher, those blocks on 4×16×16 VAE latents: the reference world.

It counts each teacher's parameters and the share held by the weights of the Linears the WaDi student adapts
(the student rule) and of the attention and feed-forward Linears inside its transformer blocks (the fake-score
rule, which skips ``proj_in``, ``proj_out``, ``time_emb_proj``), and times, interleaved
(:func:`~.measure.time_ms`, medians), one teacher training step (:func:`wadi_core.backbones.tiny.denoiser_step`,
the step of the teacher's training loop: ε-prediction forward, backward, clipping, AdamW, at the recipe's batch
32) and one generator step (:func:`wadi_core.distill.vsd_step` with the tiny WaDi recipe
``student_config(distill, "lorad")``: LoRaD student and fake score, batch 16, its fake-score updates per step).
Text states are random, of the tiny CLIP's shape (16 tokens × 64): a step's cost does not depend on their values.

Derived: the steps of each world that fit in the CPU time of the latent world's teacher training
(``latent_teacher.steps``, 6,000 steps) and of its distillation (``distill.steps``, 1,000 steps), and each step's
cost relative to the latent world's. Not timed: the teacher's EMA update, the fake-score warm-up (once per run),
the VAE's training and decoding.

Table: ``results/tables/benchmarks_worlds.{csv,md,tex}`` (``--quick``: ``*_quick``, batches 2 and 1, one step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import pandas as pd
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from ..adapters import count_trainable, linear_weight_share
from ..backbones.paper import count_parameters
from ..backbones.tiny import denoiser_step, make_scheduler, teacher_unet_config
from ..distill import VSDConfig, build_vsd, student_config, vsd_step
from ..profiles import Profile, TeacherTrainConfig, get_profile
from ..reporting import save_table
from .measure import environment_header, time_ms

REFERENCE_WORLD = "latent"
TEXT_EXAMPLES = 64  # random text states (and training examples) the steps draw their batches from
QUICK_TEACHER_BATCH, QUICK_VSD_BATCH = 2, 1
Step = Callable[[], object]  # one timed call of time_ms


class World(NamedTuple):
    """A tiny world's teacher: its training recipe and the (channels, size, size) of what it denoises."""

    description: str
    teacher: TeacherTrainConfig
    channels: int
    size: int


def worlds(profile: Profile) -> dict[str, World]:
    """The three worlds of ``profile`` (module doc), the reference :data:`REFERENCE_WORLD` last."""
    pixels = profile.world.resolution
    latent = pixels // 2 ** (len(profile.vae.block_out_channels) - 1)  # AutoencoderKL halves at all levels but one
    return {
        "pixel": World("(a) pixel teacher", profile.teacher, 3, pixels),
        "pixel_sd15_attention": World("(b) pixel, SD1.5 attention", profile.latent_teacher, 3, pixels),
        REFERENCE_WORLD: World("(c) latent tiny SD", profile.latent_teacher, profile.vae.latent_channels, latent),
    }


def cross_attention_at(unet_config: dict) -> str:
    """Where a U-Net config cross-attends: the side of each down level with cross-attention, then ``mid``."""
    size = unet_config["sample_size"]
    sizes = [f"{size // 2**level}×{size // 2**level}" for level, block in enumerate(unet_config["down_block_types"])
             if block.startswith("CrossAttn")]
    return ", ".join([*sizes, "mid"])


def world_costs(profile: Profile, teacher_batch: int | None = None, vsd_batch: int | None = None,
                repeats: int = 5, warmup: int = 1, threads: int = 1, seed: int = 0) -> pd.DataFrame:
    """Parameters, Linear shares and the median ms of a teacher step and of a WaDi generator step per world.

    Args:
        profile: whose teacher recipes, VAE, tiny CLIP shape and distillation recipe define the worlds.
        teacher_batch, vsd_batch: override the recipes' batch sizes (quick runs); None keeps them.
        repeats, warmup: timed and untimed rounds; every round runs each world's two steps once, interleaved.
        threads: ``torch.set_num_threads`` while timing (restored afterwards).
        seed: of the random text states and training examples (the weights use each recipe's seed).

    Returns:
        One row per world (index ``world``), columns: description, input, cross_attention_at, params,
        student_linear_share, block_linear_share, student_trainable (of the LoRaD student), teacher_batch,
        vsd_batch, threads, teacher_step_ms, vsd_step_ms. The caller's global RNG is left as it was.
    """
    vsd_config = student_config(profile.distill, "lorad", **({} if vsd_batch is None else {"batch_size": vsd_batch}))
    scheduler = make_scheduler()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            generator = torch.Generator().manual_seed(seed)
            text_shape = (profile.clip.max_length, profile.clip.hidden_size)
            text_states = torch.randn(TEXT_EXAMPLES, *text_shape, generator=generator)
            text = text_states, torch.randn(1, *text_shape, generator=generator)  # (states, the null prompt's)
            rows, calls = {}, {}
            for name, world in worlds(profile).items():
                if teacher_batch is not None:
                    world = world._replace(teacher=dataclasses.replace(world.teacher, batch_size=teacher_batch))
                rows[name], calls[f"{name}: teacher"], calls[f"{name}: vsd"] = _world_steps(
                    world, scheduler, text, vsd_config, generator)
                rows[name]["threads"] = threads
            ms = time_ms(calls, repeats, warmup)
    finally:
        torch.set_num_threads(previous_threads)
    for name, row in rows.items():
        row["teacher_step_ms"], row["vsd_step_ms"] = ms[f"{name}: teacher"], ms[f"{name}: vsd"]
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("world")


def _world_steps(world: World, scheduler: DDPMScheduler, text: tuple[torch.Tensor, torch.Tensor],
                 vsd_config: VSDConfig, generator: torch.Generator) -> tuple[dict, Step, Step]:
    """(the counts of ``world``'s row, its teacher step, its VSD step) for :func:`world_costs`; ``text`` is (the
    text states (N, L, D), the null state (1, L, D)), ``generator`` draws the training examples."""
    text_states, null_state = text
    recipe = world.teacher
    unet_config = teacher_unet_config(recipe, world.size, text_states.shape[-1], world.channels)
    torch.manual_seed(recipe.seed)
    teacher = UNet2DConditionModel(**unet_config).train()
    # Copied before its first step: build_vsd freezes the copy it is given and adapts two more copies.
    state = build_vsd(copy.deepcopy(teacher), scheduler, text_states, null_state, vsd_config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=recipe.lr, weight_decay=0.0)  # as train_denoiser's
    examples = torch.randn(TEXT_EXAMPLES, world.channels, world.size, world.size, generator=generator)
    teacher_step = partial(denoiser_step, teacher, optimizer, scheduler, examples, text_states, null_state, recipe,
                           torch.Generator().manual_seed(recipe.seed))
    row = {
        "description": world.description,
        "input": f"{world.channels}×{world.size}×{world.size}",
        "cross_attention_at": cross_attention_at(unet_config),
        "params": count_parameters(teacher),
        "student_linear_share": linear_weight_share(teacher, "student"),
        "block_linear_share": linear_weight_share(teacher, "fake"),
        "student_trainable": count_trainable(state.raw_student),
        "teacher_batch": recipe.batch_size,
        "vsd_batch": vsd_config.batch_size,
    }
    return row, teacher_step, partial(vsd_step, state)


def add_equal_budget_columns(table: pd.DataFrame, teacher_steps: int, vsd_steps: int,
                             reference: str = REFERENCE_WORLD) -> pd.DataFrame:
    """``table`` (of :func:`world_costs`) with, per kind of step (``teacher``, ``vsd``), ``<kind>_cost_vs_<reference>``
    (its ms over the reference world's) and ``<kind>_steps_equal_budget``: the steps that fit, rounded, in the time
    of ``teacher_steps`` (``vsd_steps``) steps of the reference world."""
    if reference not in table.index:
        raise ValueError(f"the equal budget needs the {reference!r} row; the table has {list(table.index)}")
    table = table.copy()
    for kind, budget_steps in (("teacher", teacher_steps), ("vsd", vsd_steps)):
        ms = table[f"{kind}_step_ms"]
        table[f"{kind}_cost_vs_{reference}"] = ms / ms[reference]
        table[f"{kind}_steps_equal_budget"] = (budget_steps * ms[reference] / ms).round().astype(int)
    return table


def run_worlds_benchmark(profile: Profile, quick: bool = False, repeats: int = 5, warmup: int = 1,
                         threads: int = 1) -> pd.DataFrame:
    """:func:`world_costs` of ``profile`` (``quick``: batches :data:`QUICK_TEACHER_BATCH` and
    :data:`QUICK_VSD_BATCH`) with :func:`add_equal_budget_columns` at the latent teacher's training steps and the
    distillation's generator steps."""
    batches = dict(teacher_batch=QUICK_TEACHER_BATCH, vsd_batch=QUICK_VSD_BATCH) if quick else {}
    table = world_costs(profile, repeats=repeats, warmup=warmup, threads=threads, **batches)
    return add_equal_budget_columns(table, profile.latent_teacher.steps, profile.distill.steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks worlds``."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds, median reported (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1; quick 0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"batches {QUICK_TEACHER_BATCH} (teacher) and {QUICK_VSD_BATCH} (VSD), one round; "
                             "table *_quick")


def main(args: argparse.Namespace) -> int:
    """Run the worlds benchmark, print and save its table."""
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    profile = get_profile("tiny")
    header = (f"{environment_header(args.threads)}; random weights, median of {repeats}; equal budget: the latent "
              f"world's {profile.latent_teacher.steps:,} teacher steps and {profile.distill.steps:,} VSD steps")
    print(header)
    table = run_worlds_benchmark(profile, args.quick, repeats, warmup, args.threads)
    print(table.to_string(float_format="{:.4g}".format))
    save_table(table, "benchmarks_worlds_quick" if args.quick else "benchmarks_worlds",
               caption=f"Teacher training step and WaDi generator step in three tiny worlds ({header})")
    return 0
