"""Notebook 03's fair comparison of students (WaDi Table 1 and the ablations of §4.3): every method's learning rate
from one sweep at one short budget, and every reported row over several seeds.

The paper trains every student at lr 1e-4. A miniature cannot assume that one value suits LoRaD, LoRA, DoRA and a
full fine-tune alike, so :func:`lr_sweep` distils each method at every lr of ``DistillConfig.lr_sweep`` for
``lr_sweep_steps`` generator steps and :func:`best_lrs` picks each method's lr by FID. Sweep students are not
bundled: only their scores are, as small JSON records (:func:`~wadi_core.artifacts.load_or_compute_record`).
:func:`seed_summary` and :func:`beyond_spread` turn per-seed scores into mean ± spread and into claims that hold
only where a difference exceeds the spread.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..artifacts import (
    artifact_path,
    cache_dir,
    load_checkpoint,
    load_or_compute_record,
    outdated_by_fresh,
    save_checkpoint,
)
from ..profiles import Profile
from ..world import make_split
from .config import VSDConfig
from .students import (
    STUDENT_KIND,
    STUDENT_METHODS,
    _artifact_key,
    _new_student,
    distill,
    load_or_train_student,
    one_step_generate,
    student_config,
)
from .training_data import pair_x0_error, teacher_pairs
from .vsd import _load_params, _optimizer, _trainable

SWEEP_KIND = "sweep_scores"
SEED_KIND = "seed_scores"
RECIPE_KIND = "recipe_scores"
CEILING_KIND = "ceiling_scores"

Scorer = Callable[[nn.Module], dict[str, float]]


def sweep_config(profile: Profile, method: str, lr: float, **overrides) -> VSDConfig:
    """The recipe of one sweep point: the method's student recipe at ``lr`` for ``lr_sweep_steps`` steps."""
    return student_config(profile.distill, method, student_lr=lr, steps=profile.distill.lr_sweep_steps, **overrides)


def _train_prompts(profile: Profile) -> list[str]:
    return sorted(set(make_split("train", profile.world).captions))


def _distilled(profile: Profile, backbone, config: VSDConfig, progress: bool) -> nn.Module:
    """A student distilled with ``config`` on the training captions, resumable from its run directory."""
    prompts = _train_prompts(profile)
    run_dir = cache_dir() / "vsd" / artifact_path(STUDENT_KIND, _artifact_key(backbone, prompts, config)).stem
    result = distill(backbone, prompts, config, run_dir, progress=progress)
    return result.ema_student or result.student


def record_key(profile: Profile, backbone, config: VSDConfig, score_key: dict) -> dict:
    """The key of a scored student's record: the student's artifact key (backbone, training captions, ``config``)
    and ``score_key`` (what determines the scores)."""
    return {"student": _artifact_key(backbone, _train_prompts(profile), config), "score": score_key}


def record_path(kind: str, profile: Profile, backbone, config: VSDConfig, score_key: dict) -> Path:
    """Where the ``kind`` record of the student distilled with ``config`` and scored under ``score_key`` lives
    (``<data dir>/<kind>-<hash>.json``), whether or not it exists yet."""
    return artifact_path(kind, record_key(profile, backbone, config, score_key), ".json")


def _scored_student(profile: Profile, backbone, config: VSDConfig, score: Scorer, score_key: dict, kind: str,
                    label: str, progress: bool, bundled: Callable[[], nn.Module] | None = None) -> dict[str, float]:
    """Scores of a student distilled with ``config`` on the training captions (or of ``bundled()``, the bundled
    student of that config), cached as a ``kind`` record keyed by :func:`record_key`."""

    def compute() -> dict[str, float]:
        student = bundled() if bundled is not None else _distilled(profile, backbone, config, progress)
        return {name: float(value) for name, value in score(student.eval()).items()}

    return load_or_compute_record(kind, record_key(profile, backbone, config, score_key), compute, label=label)


def sweep_point(profile: Profile, backbone, method: str, lr: float, score: Scorer, score_key: dict,
                progress: bool = False, **overrides) -> dict[str, float]:
    """Scores of the ``method`` student distilled at ``lr`` (:func:`sweep_config`), cached by the student's
    artifact key and ``score_key`` (what determines ``score``: prompts, seed, feature network)."""
    config = sweep_config(profile, method, lr, **overrides)
    return _scored_student(profile, backbone, config, score, score_key, SWEEP_KIND,
                           f"{method} lr-sweep student (lr {lr:g})", progress)


def student_scores(profile: Profile, backbone, method: str, score: Scorer, score_key: dict, rank: int | None = None,
                   **overrides) -> dict[str, float]:
    """Scores of the bundled ``method`` student of ``profile`` (optionally another ``rank`` or recipe
    ``overrides``, as :func:`~.students.load_or_train_student` takes them), kept as a record keyed by the student's
    artifact key and ``score_key``: a notebook re-reads what scoring thousands of images once measured. The record
    is the one :func:`seed_runs` keeps for the profile's own seed."""
    config = student_config(profile.distill, method, rank, **overrides)

    def bundled_student() -> nn.Module:
        return load_or_train_student(profile, backbone, method, rank, progress=False, **overrides).model

    return _scored_student(profile, backbone, config, score, score_key, SEED_KIND, f"{method} student scores",
                           progress=False, bundled=bundled_student)


def recipe_study(profile: Profile, backbone, variants: Mapping[str, dict], score: Scorer, score_key: dict,
                 method: str = "lorad", progress: bool = True) -> pd.DataFrame:
    """One row per named variant of the profile's ``method`` recipe (``{name: VSDConfig overrides}``, e.g. a
    longer run, another fake-score rank or guidance scale): the search for a recipe whose one-step student reaches
    the teacher, every attempt's scores kept as a record so that the notebook shows what each one measured. No
    variants give an empty frame (index ``variant``, one column ``steps``)."""
    rows = []
    for name, overrides in tqdm(variants.items(), desc="recipe variants", disable=not progress):
        config = student_config(profile.distill, method, **overrides)
        scores = _scored_student(profile, backbone, config, score, score_key, RECIPE_KIND,
                                 f"{method} student ({name})", progress)
        rows.append({"variant": name, "steps": config.steps, **scores})
    return pd.DataFrame(rows, columns=None if rows else ["variant", "steps"]).set_index("variant")


def variant_seed_runs(profile: Profile, backbone, overrides: dict, score: Scorer, score_key: dict,
                      method: str = "lorad", progress: bool = True) -> pd.DataFrame:
    """:func:`recipe_study` of one recipe variant (``overrides``, its own ``seed`` dropped) at every training seed
    of ``DistillConfig.seeds``, one row each (index ``seed <s>``): a variant set against the recipe's seed runs
    (:func:`seed_runs`) beyond their spreads."""
    overrides = {field: value for field, value in overrides.items() if field != "seed"}
    variants = {f"seed {seed}": {**overrides, "seed": seed} for seed in profile.distill.seeds}
    return recipe_study(profile, backbone, variants, score, score_key, method=method, progress=progress)


def lr_sweep(profile: Profile, backbone, score: Scorer, score_key: dict,
             methods: Sequence[str] = STUDENT_METHODS, progress: bool = True) -> pd.DataFrame:
    """One row per (method, lr) of ``DistillConfig.lr_sweep``: the scores of :func:`sweep_point`."""
    grid = [(method, lr) for method in methods for lr in profile.distill.lr_sweep]
    rows = []
    for method, lr in tqdm(grid, desc="lr sweep", disable=not progress):
        rows.append({"method": method, "lr": lr, **sweep_point(profile, backbone, method, lr, score, score_key)})
    return pd.DataFrame(rows)


def seed_runs(profile: Profile, backbone, method: str, score: Scorer, score_key: dict, rank: int | None = None,
              progress: bool = True, **overrides) -> pd.DataFrame:
    """One row per seed of ``DistillConfig.seeds``: the scores of the ``method`` student (optionally ``rank``
    and recipe ``overrides``, e.g. its best ``student_lr``) trained with that seed. The profile's own seed is the
    bundled student (:func:`~.students.load_or_train_student`); the other seeds are scored and kept as records."""

    def bundled_student() -> nn.Module:
        return load_or_train_student(profile, backbone, method, rank, **overrides).model

    rows = []
    for seed in tqdm(profile.distill.seeds, desc=f"{method} seeds", disable=not progress):
        config = student_config(profile.distill, method, rank, **{**overrides, "seed": seed})
        bundled = bundled_student if seed == profile.distill.seed else None
        record = _scored_student(profile, backbone, config, score, score_key, SEED_KIND,
                                 f"{method} student (seed {seed})", progress=False, bundled=bundled)
        rows.append({"method": method, "rank": config.student_rank, "seed": seed, **record})
    return pd.DataFrame(rows)


def best_lrs(sweep: pd.DataFrame, metric: str = "FID") -> dict[str, float]:
    """Each method's lr with the lowest ``metric`` in a :func:`lr_sweep` table (ties: the smaller lr)."""
    ranked = sweep.sort_values([metric, "lr"])
    return {method: float(ranked.loc[ranked["method"] == method, "lr"].iloc[0])
            for method in dict.fromkeys(sweep["method"])}


def seed_summary(runs: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, spread (sample standard deviation over seeds) and seed count of ``metrics`` per ``by`` group of a
    table with one row per (group, seed): columns ``<metric>`` (the mean), ``<metric> ±`` and ``seeds``."""
    grouped = runs.groupby(by, sort=False)
    summary = grouped[list(metrics)].mean()
    spread = grouped[list(metrics)].std(ddof=1).fillna(0.0)
    for metric in metrics:
        summary[f"{metric} ±"] = spread[metric]
    summary["seeds"] = grouped.size()
    return summary[[c for metric in metrics for c in (metric, f"{metric} ±")] + ["seeds"]]


def mean_spread(group: pd.Series, metric: str = "FID") -> str:
    """``"<mean> ± <spread>"`` of ``metric`` in one group (row) of a :func:`seed_summary` table, to one decimal: how
    a claim states a mean over seeds."""
    return f"{group[metric]:.1f} ± {group[f'{metric} ±']:.1f}"


def seed_comparison(runs: Mapping[str, pd.DataFrame], metrics: Sequence[str], teacher: Mapping[str, float],
                    ratios: Sequence[str] = ("FID", "acc. objects"), by: str = "student") -> pd.DataFrame:
    """:func:`seed_summary` of several students' seed runs (``{label: runs}``, one row per seed each), one row per
    label in the given order (index ``by``), with ``<metric> / teacher`` columns for each of ``ratios``: the
    tables that set a variant against the recipe over seeds, and both against the teacher's quality bar."""
    labelled = pd.concat([label_runs.assign(**{by: label}) for label, label_runs in runs.items()])
    table = seed_summary(labelled, by, metrics)
    for metric in ratios:
        table[f"{metric} / teacher"] = table[metric] / teacher[metric]
    return table


def beyond_spread(summary: pd.DataFrame, better: Hashable, worse: Hashable, metric: str = "FID",
                  lower_is_better: bool = True) -> bool:
    """True when group ``better`` beats ``worse`` on ``metric`` by more than the two spreads together
    (means ± one standard deviation over seeds do not overlap): a claim printed as holding needs this. False
    when either group has fewer than two seeds (:func:`seed_summary`'s ``seeds``), which leave no spread."""
    a, b = summary.loc[better], summary.loc[worse]
    if min(a["seeds"], b["seeds"]) < 2:
        return False
    gap = (b[metric] - a[metric]) if lower_is_better else (a[metric] - b[metric])
    return bool(gap > a[f"{metric} ±"] + b[f"{metric} ±"])


FIT_KIND = "regression_fit"


def regression_ceiling(profile: Profile, backbone, score: Scorer, score_key: dict, method: str = "lorad",
                       pairs: int = 1024, steps: int | None = None, lr: float | None = None,
                       progress: bool = True) -> dict[str, float]:
    """Scores of a one-step student fitted by **regression** to the teacher's own samples instead of by VSD: what
    the student (the profile's ``method`` adapter on the teacher) can express in one step when it is told the
    answer: a reference for the VSD students at a given budget (``steps``), with or without VSD.

    :func:`teacher_pairs` gives ``pairs`` (noise z, training caption, teacher x0) triples, sampled with the
    multi-step teacher (``profile.sampling.num_inference_steps`` DDIM steps at the distillation's
    ``guidance_scale``, z from the distillation's seed); the student then minimises ‖x0(z, c) − x0_teacher(z, c)‖²
    over random batches of them (the ODE pairs of DMD's regression loss, here the only loss), ``steps`` steps
    (default: the distillation's) of AdamW at ``lr`` (default: the method's student lr), batch and clipping as in
    distillation. Cached as a ``ceiling_scores`` record keyed by everything that determines it and ``score_key``:
    the scores of the fitted student, and ``pair_mse_at_init`` / ``pair_mse_fitted``, its mean squared x0 error over
    all pairs before and after fitting. The fitted student's trainable weights are kept in the scratch folder, so
    that scoring the same fit under another ``score_key`` does not fit it again.
    """
    config = student_config(profile.distill, method, **({} if lr is None else {"student_lr": lr}),
                            **({} if steps is None else {"steps": steps}))
    sampling = profile.sampling
    prompts = _train_prompts(profile)
    fit_key = {"student": _artifact_key(backbone, prompts, config), "pairs": pairs,
               "teacher_steps": sampling.num_inference_steps}
    fit_path = cache_dir() / FIT_KIND / artifact_path(FIT_KIND, fit_key).name

    def compute() -> dict[str, float]:
        data = teacher_pairs(backbone, prompts, pairs, config.seed, sampling.num_inference_steps,
                             config.guidance_scale, sampling.batch_size, progress)
        generator = torch.Generator().manual_seed(config.seed)
        torch.randn(pairs, *backbone.latent_shape, generator=generator)  # the draw of z: batches follow it
        student = _new_student(backbone.denoiser, config)

        def error(index: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return pair_x0_error(student, data, index, backbone.scheduler, backbone.one_step_alpha_bar,
                                 reduction=reduction)

        @torch.no_grad()
        def mse_over_pairs() -> float:
            chunks = torch.arange(pairs).split(sampling.batch_size)
            return sum(float(error(i, "sum")) for i in chunks) / data["targets"].numel()

        mse_at_init = mse_over_pairs()
        if fit_path.exists() and not outdated_by_fresh(fit_path):
            _load_params(student, load_checkpoint(fit_path, fit_key)[0], "student", fit_path)
        else:
            params = list(_trainable(student).values())
            optimizer = _optimizer(config, params, config.student_lr)
            student.train()
            bar = tqdm(range(config.steps), desc=f"{method} regression to the teacher", disable=not progress)
            for _ in bar:
                index = torch.randint(0, pairs, (config.batch_size,), generator=generator)
                loss = error(index)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(mse=f"{loss.item():.4f}")
            fit_path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(fit_path, {f"student.{name}": p for name, p in _trainable(student).items()}, fit_key)
        student.eval()
        scores = {name: float(value) for name, value in score(student).items()}
        return {**scores, "pair_mse_at_init": mse_at_init, "pair_mse_fitted": mse_over_pairs()}

    return load_or_compute_record(CEILING_KIND, {**fit_key, "score": score_key}, compute,
                                  label=f"{method} regression ceiling")


WORLD_KIND = "world_scores"
WORLD_NAMES = ("pixel", "pixel_sd15_attention", "latent")
ImageScorer = Callable[[torch.Tensor], dict[str, float]]


def world_recipes(profile: Profile, sd15_attention_teacher_steps: int) -> dict[str, dict]:
    """What defines each candidate tiny world of :func:`world_study`: its teacher recipe, and the VAE's for the
    latent one (the three worlds of :mod:`wadi_core.benchmarks.worlds`)."""
    pixel_sd15 = replace(profile.latent_teacher, steps=sd15_attention_teacher_steps)
    return {"pixel": {"teacher": profile.teacher}, "pixel_sd15_attention": {"teacher": pixel_sd15},
            "latent": {"teacher": profile.latent_teacher, "vae": profile.vae}}


def _world_backbone(profile: Profile, world: str, recipe: dict):
    from ..backbones import load_tiny_backbone, load_tiny_sd_backbone

    if world == "latent":
        return load_tiny_sd_backbone(profile)
    return load_tiny_backbone(replace(profile, teacher=recipe["teacher"]), name=f"tiny-{world.replace('_', '-')}")


def world_study(profile: Profile, prompts: Sequence[str], evaluate: ImageScorer, evaluate_key: dict,
                vsd_steps: Mapping[str, int], sd15_attention_teacher_steps: int, method: str = "lorad",
                seed: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Which tiny world shows one-step distillation best: the same short distillation of the ``method`` student,
    at one CPU budget, on (a) the pixel teacher, (b) a pixel teacher with SD1.5's attention pattern and (c) the
    latent tiny SD, each student's FID set against its own teacher's. The worlds run are the keys of ``vsd_steps``
    (any of :data:`WORLD_NAMES`), so a world whose teacher is costly can join the table later.

    Each world's teacher is its recipe of :func:`world_recipes` (the pixel and latent teachers are the profile's
    bundled ones; (b) is trained for ``sd15_attention_teacher_steps``, the steps that fit in the latent teacher's
    training time); the student is the profile's ``method`` recipe run for ``vsd_steps[world]`` generator steps
    (the steps that fit in one CPU budget, :func:`wadi_core.benchmarks.worlds.add_equal_budget_columns`; the
    latent student is :func:`load_or_train_student`'s, bundled at the profile's steps). The
    teacher samples ``prompts`` with ``profile.sampling.num_inference_steps`` DDIM steps at the distillation's
    guidance, the student in one step, both from the noise of ``seed`` (default: the distillation's), and
    ``evaluate`` scores the images (e.g. :func:`wadi_core.eval.score_images` on those prompts; ``evaluate_key``
    names what determines it). Each world is one ``world_scores`` record keyed by its recipes, so the table is read
    back without its teachers.

    Returns:
        One row per world: ``teacher_steps``, ``vsd_steps``, ``teacher <score>`` and ``student <score>`` for every
        score, and ``FID ratio`` (student over teacher).
    """
    if not vsd_steps or set(vsd_steps) - set(WORLD_NAMES):
        raise ValueError(f"vsd_steps names the worlds to run, each of {WORLD_NAMES}; got {sorted(vsd_steps)}")
    seed = profile.distill.seed if seed is None else seed
    guidance = profile.distill.guidance_scale
    sampling_steps = profile.sampling.num_inference_steps
    rows = []
    for world, recipe in world_recipes(profile, sd15_attention_teacher_steps).items():
        if world not in vsd_steps:
            continue
        config = student_config(profile.distill, method, steps=vsd_steps[world])
        key = {"world": world, "data": profile.world, "clip": profile.clip, **recipe, "vsd": config.key_dict(),
               "teacher_sampling": {"steps": sampling_steps, "guidance_scale": guidance}, "seed": seed,
               "prompts": len(prompts), "score": evaluate_key}

        def compute(world=world, recipe=recipe, config=config) -> dict[str, float]:
            backbone = _world_backbone(profile, world, recipe)
            student = (load_or_train_student(profile, backbone, method, steps=config.steps).model if world == "latent"
                       else _distilled(profile, backbone, config, progress)).eval()
            teacher_images = backbone.sample(list(prompts), sampling_steps, guidance, seed=seed,
                                             batch_size=profile.sampling.batch_size, progress=progress)
            student_images = one_step_generate(student, backbone, list(prompts), seed)
            scores = {f"teacher {name}": float(value) for name, value in evaluate(teacher_images).items()}
            scores.update({f"student {name}": float(value) for name, value in evaluate(student_images).items()})
            return scores

        record = load_or_compute_record(WORLD_KIND, key, compute, label=f"{method} student of the {world} world")
        scores = {name: record[name] for name in sorted(record, key=lambda name: (name.startswith("student "), name))}
        rows.append({"world": world, "teacher_steps": recipe["teacher"].steps, "vsd_steps": config.steps, **scores})
    table = pd.DataFrame(rows).set_index("world")
    table["FID ratio"] = table["student FID"] / table["teacher FID"]
    return table
