"""The fair comparison of notebook 03: one lr sweep for every student method (scores cached as JSON records),
each method's best lr, and per-seed summaries whose claims hold only beyond the spread."""

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
from transformers import CLIPModel

from wadi_core.artifacts import REPO_ROOT, ArtifactError, cache_dir, load_or_compute_record
from wadi_core.backbones import load_backbone, load_or_train_tiny_clip
from wadi_core.backbones.backbone import sample_ddim
from wadi_core.backbones.tiny import clip_model_config, train_tokenizer
from wadi_core.distill import (
    STUDENT_METHODS,
    best_lrs,
    beyond_spread,
    load_or_train_student,
    lr_sweep,
    mean_spread,
    one_step_generate,
    recipe_search,
    recipe_stages,
    recipe_study,
    regression_ceiling,
    seed_comparison,
    seed_runs,
    seed_summary,
    student_config,
    student_scores,
    students,
    studies,
    sweep_config,
    teacher_pairs,
    training_data,
    variant_seed_runs,
    world_study,
)
from wadi_core.distill.students import COMBINATIONS, DMD_REGRESSION, FIRST_RECIPE, RECIPE, REGRESSION_WARMUP
from wadi_core.distill.studies import RECIPE_KIND, record_path
from wadi_core.distill.training_data import PAIRS_KIND
from wadi_core.distill.vsd import _optimizer as vsd_optimizer
from wadi_core.eval import (
    ShapesFeatureNet,
    load_or_train_feature_net,
    one_step_key,
    recorded_scores,
    reference_folder,
    save_images,
    score_images,
    student_scorer,
)
from wadi_core.profiles import ClipTrainConfig, get_profile
from wadi_core.world import make_split


def counting_score():
    """A scorer whose FID is the number of students it has scored so far, and the list of those students."""
    seen = []

    def score(student):
        seen.append(student)
        return {"FID": float(len(seen))}

    return score, seen


def test_record_is_computed_once_then_read(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"FID": 12.5}

    assert load_or_compute_record("scores", {"a": 1}, compute) == {"FID": 12.5}
    assert load_or_compute_record("scores", {"a": 1}, compute) == {"FID": 12.5}
    assert len(calls) == 1
    assert load_or_compute_record("scores", {"a": 2}, compute) == {"FID": 12.5} and len(calls) == 2
    monkeypatch.setenv("WADI_NO_TRAIN", "1")
    with pytest.raises(ArtifactError, match="WADI_NO_TRAIN"):
        load_or_compute_record("scores", {"a": 3}, compute)


def test_damaged_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path))
    load_or_compute_record("scores", {"a": 1}, lambda: {"FID": 1.0})
    (path,) = tmp_path.glob("scores-*.json")
    stored = json.loads(path.read_text())
    stored["record"]["FID"] = 0.5
    path.write_text(json.dumps(stored))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_or_compute_record("scores", {"a": 1}, lambda: {"FID": 1.0})


def test_sweep_config_sets_lr_and_budget(smoke_profile):
    config = sweep_config(smoke_profile, "full", 3e-4)
    assert config.student_lr == 3e-4 and config.steps == smoke_profile.distill.lr_sweep_steps
    assert config.student_method == "full"


def test_lr_sweep_trains_each_point_once(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    score, seen = counting_score()

    sweep = lr_sweep(smoke_profile, backbone, score, {"scorer": "count"}, methods=("lorad",), progress=False)
    assert list(sweep["lr"]) == list(smoke_profile.distill.lr_sweep) and list(sweep["FID"]) == [1.0, 2.0]
    again = lr_sweep(smoke_profile, backbone, score, {"scorer": "count"}, methods=("lorad",), progress=False)
    pd.testing.assert_frame_equal(sweep, again)
    assert len(seen) == 2  # the second sweep read the cached records
    assert best_lrs(sweep) == {"lorad": smoke_profile.distill.lr_sweep[0]}


def test_recipe_study_scores_each_variant_once_with_its_overrides(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    score, seen = counting_score()

    variants = {"short": {"steps": 1}, "short, fake rank 2": {"steps": 1, "fake_rank": 2}}
    study = recipe_study(smoke_profile, backbone, variants, score, {"scorer": "count"}, progress=False)
    assert list(study.index) == list(variants) and list(study["steps"]) == [1, 1]
    assert list(study["FID"]) == [1.0, 2.0]
    again = recipe_study(smoke_profile, backbone, variants, score, {"scorer": "count"}, progress=False)
    pd.testing.assert_frame_equal(study, again)
    assert len(seen) == 2  # the second study read the cached records
    with pytest.raises(ValueError, match="unknown VSDConfig field"):
        recipe_study(smoke_profile, backbone, {"typo": {"fake_rnk": 2}}, score, {"scorer": "count"}, progress=False)


def test_variant_seed_runs_train_the_variant_at_every_seed_whatever_seed_it_names(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    score, seen = counting_score()
    seeds = smoke_profile.distill.seeds
    runs = variant_seed_runs(smoke_profile, backbone, {"steps": 1, "seed": 99}, score, {"scorer": "variant"},
                             progress=False)
    assert list(runs.index) == [f"seed {seed}" for seed in seeds] and list(runs["FID"]) == [1.0, 2.0]
    single = recipe_study(smoke_profile, backbone, {"one": {"steps": 1, "seed": seeds[1]}}, score,
                          {"scorer": "variant"}, progress=False)
    assert single.loc["one", "FID"] == 2.0 and len(seen) == 2  # the same record as the variant's second seed


def test_best_lrs_picks_lowest_fid_per_method():
    sweep = pd.DataFrame({"method": ["a", "a", "b", "b"], "lr": [1e-4, 1e-3, 1e-4, 1e-3], "FID": [5, 3, 2, 2]})
    assert best_lrs(sweep) == {"a": 1e-3, "b": 1e-4}


def test_seed_summary_and_spread():
    runs = pd.DataFrame({"method": ["x"] * 3 + ["y"] * 3 + ["z"] * 3,
                         "FID": [10.0, 11.0, 12.0, 20.0, 21.0, 22.0, 11.5, 12.5, 13.5]})
    summary = seed_summary(runs, "method", ["FID"])
    assert summary.loc["x", "FID"] == pytest.approx(11.0) and summary.loc["x", "FID ±"] == pytest.approx(1.0)
    assert summary.loc["x", "seeds"] == 3
    assert beyond_spread(summary, "x", "y")  # 10 apart, spreads 1 + 1
    assert not beyond_spread(summary, "x", "z")  # 1.5 apart < 2
    assert not beyond_spread(summary, "y", "x")  # worse, not better
    assert mean_spread(summary.loc["z"]) == "12.5 ± 1.0"
    one_seed = seed_summary(pd.DataFrame({"method": ["x", "y"], "FID": [10.0, 20.0]}), "method", ["FID"])
    assert not beyond_spread(one_seed, "x", "y")  # one seed each: no spread, so no claim holds


def test_seed_comparison_keeps_the_order_and_divides_by_the_teacher():
    recipe = pd.DataFrame({"seed": [6, 7, 8], "FID": [30.0, 32.0, 34.0], "acc. objects": [0.7, 0.8, 0.9]})
    variant = pd.DataFrame({"seed": [6, 7, 8], "FID": [20.0, 21.0, 22.0], "acc. objects": [0.8, 0.8, 0.8]})
    table = seed_comparison({"z recipe": recipe, "a variant": variant}, ["FID", "acc. objects"],
                            {"FID": 10.0, "acc. objects": 0.9, "unused": 1.0}, by="recipe")
    assert list(table.index) == ["z recipe", "a variant"] and table.index.name == "recipe"
    assert table.loc["z recipe", "FID ±"] == pytest.approx(2.0) and table.loc["a variant", "seeds"] == 3
    assert table.loc["a variant", "FID / teacher"] == pytest.approx(2.1)
    assert table.loc["z recipe", "acc. objects / teacher"] == pytest.approx(0.8 / 0.9)
    assert beyond_spread(table, "a variant", "z recipe")  # 11 apart, spreads 2 + 1
    assert "seed" not in table.columns and "unused / teacher" not in table.columns
    with pytest.raises(KeyError):
        seed_comparison({"a": recipe}, ["FID"], {"acc. objects": 0.9}, ratios=["FID"])


def test_seed_runs_score_each_seed_and_bundle_the_profiles_own(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    firsts = []

    def score(student):
        firsts.append(next(p for p in student.parameters() if p.requires_grad).detach().clone())
        return {"FID": float(len(firsts))}

    runs = seed_runs(smoke_profile, backbone, "lorad", score, {"scorer": "seeds"}, progress=False)
    assert list(runs["seed"]) == list(smoke_profile.distill.seeds) and list(runs["FID"]) == [1.0, 2.0]
    assert not torch.equal(firsts[0], firsts[1])  # another seed trains another student
    bundled = load_or_train_student(smoke_profile, backbone, "lorad")
    assert not bundled.trained  # the profile's seed was trained as the bundled student
    again = seed_runs(smoke_profile, backbone, "lorad", score, {"scorer": "seeds"}, progress=False)
    pd.testing.assert_frame_equal(runs, again)
    assert len(firsts) == 2


def test_student_scores_reads_the_bundled_students_record_once_scored(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    score, seen = counting_score()
    first = student_scores(smoke_profile, backbone, "lora", score, {"scorer": "bundled"})
    assert first == {"FID": 1.0} and len(seen) == 1
    assert student_scores(smoke_profile, backbone, "lora", score, {"scorer": "bundled"}) == first and len(seen) == 1
    runs = seed_runs(smoke_profile, backbone, "lora", score, {"scorer": "bundled"}, progress=False)
    assert runs.loc[runs["seed"] == smoke_profile.distill.seed, "FID"].tolist() == [1.0]  # the same record
    other = student_scores(smoke_profile, backbone, "lora", score, {"scorer": "bundled"}, rank=1)
    assert other["FID"] != 1.0  # another rank: another student, another record


def test_recorded_scores_make_and_score_the_images_once(smoke_profile):
    backbone = load_backbone(smoke_profile.backbone)
    prompts = ["a red circle", "a blue square"]
    made = []

    def images():
        made.append(1)
        return backbone.one_step(prompts, seed=0)

    def evaluate(batch):
        return {"mean": batch.mean()}

    key = one_step_key(backbone, prompts, seed=0)
    assert key != one_step_key(backbone, prompts, seed=1) and key["sampler"] == "one-step"
    first = recorded_scores(key, images, evaluate, {"scorer": "mean"})
    assert recorded_scores(key, images, evaluate, {"scorer": "mean"}) == first and len(made) == 1
    assert isinstance(first["mean"], float)
    recorded_scores(key, images, evaluate, {"scorer": "another"})
    assert len(made) == 2


def test_regression_ceiling_fits_the_teacher_samples_and_is_kept_as_a_record(smoke_profile, monkeypatch):
    backbone = load_backbone(smoke_profile.backbone)
    score, seen = counting_score()
    samplings = []

    def counted_sample_ddim(*args, **kwargs):
        samplings.append(kwargs["noise"])
        return sample_ddim(*args, **kwargs)

    monkeypatch.setattr(training_data, "sample_ddim", counted_sample_ddim)

    record = regression_ceiling(smoke_profile, backbone, score, {"scorer": "count"}, pairs=8, steps=30, lr=1e-2,
                                progress=False)
    assert record["FID"] == 1.0 and not seen[0].training
    assert record["pair_mse_fitted"] < record["pair_mse_at_init"]  # the student moved toward the teacher's samples
    again = regression_ceiling(smoke_profile, backbone, score, {"scorer": "count"}, pairs=8, steps=30, lr=1e-2,
                               progress=False)
    assert again == record and len(seen) == 1  # read back from its record
    regression_ceiling(smoke_profile, backbone, score, {"scorer": "count"}, pairs=8, steps=31, lr=1e-2,
                       progress=False)
    assert len(seen) == 2  # another budget is another record
    assert len(samplings) == 1  # ... fitted to the same cached teacher pairs, sampled once
    fits = []
    monkeypatch.setattr(studies, "_optimizer", lambda *args: fits.append(args) or vsd_optimizer(*args))
    other = regression_ceiling(smoke_profile, backbone, score, {"scorer": "another"}, pairs=8, steps=30, lr=1e-2,
                               progress=False)
    assert fits == [] and other["pair_mse_fitted"] == record["pair_mse_fitted"]  # another scorer, the same fit
    distill = smoke_profile.distill
    pairs = teacher_pairs(backbone, studies._train_prompts(smoke_profile), 8, distill.seed,
                          smoke_profile.sampling.num_inference_steps, distill.guidance_scale,
                          smoke_profile.sampling.batch_size, progress=False)
    assert len(samplings) == 1 and torch.equal(pairs["z"], samplings[0])
    assert pairs["targets"].shape == pairs["z"].shape == (8, *backbone.latent_shape)


def test_a_student_with_dmd_regression_loss_trains_on_the_teacher_pairs_of_its_config(smoke_profile, monkeypatch):
    """distill samples the config's regression pairs (its seed, guidance and DDIM steps) once, in the scratch
    folder, and trains on them; the student is another artifact than the plain recipe's."""
    backbone = load_backbone(smoke_profile.backbone)
    calls = []

    def counted_teacher_pairs(*args, **kwargs):
        calls.append(args)
        return teacher_pairs(*args, **kwargs)

    monkeypatch.setattr(students, "teacher_pairs", counted_teacher_pairs)
    cached_before = set((cache_dir() / PAIRS_KIND).glob("*.safetensors"))
    overrides = dict(regression_weight=1.0, regression_pairs=4, regression_teacher_steps=2)
    regressed = load_or_train_student(smoke_profile, backbone, "lorad", progress=False, **overrides)
    plain = load_or_train_student(smoke_profile, backbone, "lorad", progress=False)
    config = regressed.config
    assert len(calls) == 1 and calls[0][2:] == (4, config.seed, 2, config.guidance_scale)
    assert calls[0][1] == studies._train_prompts(smoke_profile)  # the student's own training captions
    assert regressed.log["regression_loss"].notna().all() and regressed.path != plain.path
    assert len(set((cache_dir() / PAIRS_KIND).glob("*.safetensors")) - cached_before) == 1  # kept in the scratch


def test_world_study_scores_each_world_against_its_own_teacher_and_keeps_the_table_as_records(smoke_profile):
    prompts = make_split("coco14-like", smoke_profile.world).captions[:4]
    scored = []

    def evaluate(images):  # mean brightness as a stand-in FID: the table must carry each world's own numbers
        assert images.shape == (len(prompts), 3, smoke_profile.world.resolution, smoke_profile.world.resolution)
        scored.append(images)
        return {"FID": float(images.mean()) + 1.0}

    steps = {"pixel": 2, "pixel_sd15_attention": 3, "latent": 2}
    table = world_study(smoke_profile, prompts, evaluate, {"scorer": "brightness"}, steps,
                        sd15_attention_teacher_steps=4, progress=False)
    assert list(table.index) == ["pixel", "pixel_sd15_attention", "latent"] and len(scored) == 6
    assert table["vsd_steps"].tolist() == [2, 3, 2]
    assert table.loc["pixel_sd15_attention", "teacher_steps"] == 4
    assert table.loc["latent", "teacher_steps"] == smoke_profile.latent_teacher.steps
    fids = [float(images.mean()) + 1.0 for images in scored]
    assert table["teacher FID"].tolist() == pytest.approx(fids[0::2])
    assert table["student FID"].tolist() == pytest.approx(fids[1::2])
    assert table["FID ratio"].tolist() == pytest.approx([s / t for t, s in zip(fids[0::2], fids[1::2])])
    again = world_study(smoke_profile, prompts, evaluate, {"scorer": "brightness"}, steps,
                        sd15_attention_teacher_steps=4, progress=False)
    pd.testing.assert_frame_equal(again, table)
    assert len(scored) == 6  # read back from the records, nothing sampled or trained again
    subset = world_study(smoke_profile, prompts, evaluate, {"scorer": "brightness"}, {"pixel": 2, "latent": 2},
                         sd15_attention_teacher_steps=4, progress=False)
    pd.testing.assert_frame_equal(subset, table.drop(index="pixel_sd15_attention"))
    assert len(scored) == 6  # the same records
    for bad in ({"voxel": 2}, {}):
        with pytest.raises(ValueError, match="names the worlds to run"):
            world_study(smoke_profile, prompts, evaluate, {}, bad, sd15_attention_teacher_steps=4)


def test_student_scorer_scores_one_step_images_and_keys_what_determines_them(smoke_profile, tmp_path):
    backbone = load_backbone(smoke_profile.backbone)
    real = make_split("coco14-like", smoke_profile.world)
    reference = tmp_path / "reference"
    save_images(real.images.float() / 255, reference)
    torch.manual_seed(0)
    net = ShapesFeatureNet(feature_dim=16).eval()
    tokenizer = train_tokenizer(real.captions, ClipTrainConfig())
    clip = CLIPModel(clip_model_config(ClipTrainConfig(), tokenizer, 32)).eval()
    prompts = real.captions[:8]

    def scorer(prompts, seed):
        return student_scorer(backbone, prompts, reference, features=net, clip=clip, tokenizer=tokenizer, seed=seed)

    score, key = scorer(prompts, 3)
    student = load_or_train_student(smoke_profile, backbone, "lorad").model
    expected = score_images(one_step_generate(student, backbone, prompts, 3), prompts, reference, features=net,
                            clip=clip, tokenizer=tokenizer, precision_recall_k=3)
    assert score(student) == pytest.approx(expected)
    assert key == scorer(list(prompts), 3)[1]
    assert key != scorer(prompts, 4)[1] and key != scorer(prompts[:4], 3)[1]


def _committed_sweep_scorer(monkeypatch, prompts: str = "lr_sweep_prompts"):
    """The tiny profile, its backbone and the lr sweep's scorer (or, ``prompts="eval_prompts"``, Table 1's on all
    the evaluation prompts), reading the committed records only."""
    monkeypatch.setenv("WADI_DATA_DIR", str(REPO_ROOT / "data"))  # the committed records, not the smoke fixture's
    monkeypatch.setenv("WADI_NO_TRAIN", "1")  # every scored student must be a committed record
    profile = get_profile("tiny")
    backbone = load_backbone(profile.backbone)
    clip = load_or_train_tiny_clip(profile)
    reader = load_or_train_feature_net(profile).model
    real = make_split("coco14-like", profile.world)
    score, key = student_scorer(backbone, real.captions[: getattr(profile.distill, prompts)],
                                reference_folder(real, profile.world), features=reader, clip=clip.model,
                                tokenizer=clip.tokenizer, seed=profile.distill.seed)
    return profile, backbone, score, key


def test_latent_profile_lrs_are_the_best_of_its_committed_sweep(monkeypatch):
    profile, backbone, score, key = _committed_sweep_scorer(monkeypatch)
    sweep = lr_sweep(profile, backbone, score, key, progress=False)
    assert len(sweep) == len(STUDENT_METHODS) * len(profile.distill.lr_sweep)
    assert best_lrs(sweep) == dict(profile.distill.student_lrs)


def test_recipe_search_reads_every_variant_from_its_committed_record(monkeypatch):
    profile, backbone, score, key = _committed_sweep_scorer(monkeypatch)
    variants = recipe_search(profile.distill)
    assert variants["the recipe (the same at LoRaD r = 15)"] == {}  # the profile's recipe is one of the rows
    configs = [student_config(profile.distill, "lorad", **overrides) for overrides in variants.values()]
    read = {record_path(RECIPE_KIND, profile, backbone, config, key).stem for config in configs}
    committed = {path.stem for path in (REPO_ROOT / "data").glob(f"{RECIPE_KIND}-*.json")
                 if json.loads(path.read_text())["config"]["score"] == key}
    assert len(read) == len(variants) and read == committed  # one record per variant, every committed one listed
    study = recipe_study(profile, backbone, variants, score, key, progress=False)
    assert study.loc["the first tiny recipe", "steps"] == profile.distill.steps // 2
    assert study.loc["the recipe (the same at LoRaD r = 15)", "FID"] < study.loc["the first tiny recipe", "FID"]


def test_regression_runs_read_from_their_committed_records(monkeypatch):
    profile, backbone, score, key = _committed_sweep_scorer(monkeypatch)
    fits = {run: regression_ceiling(profile, backbone, score, key, method=run[0], pairs=run[1], steps=run[2],
                                    progress=False) for run in profile.distill.regression_runs}
    assert all(fit["pair_mse_fitted"] < fit["pair_mse_at_init"] for fit in fits.values())
    full = [fits[run]["pair_mse_fitted"] for run in sorted(run for run in fits if run[0] == "full")]
    assert len(full) >= 2 and all(a > b for a, b in zip(full, full[1:]))  # the longer the fit, the lower its error
    _, _, score_all, key_all = _committed_sweep_scorer(monkeypatch, "eval_prompts")
    method, pairs, steps = profile.distill.longest_regression_run
    on_all = regression_ceiling(profile, backbone, score_all, key_all, method=method, pairs=pairs, steps=steps,
                                progress=False)
    assert on_all["pair_mse_fitted"] == fits[(method, pairs, steps)]["pair_mse_fitted"]  # the same fit


def test_longest_regression_run_is_the_one_with_most_steps():
    assert get_profile("tiny").distill.longest_regression_run == ("full", 4_096, 8_000)
    assert replace(get_profile("tiny").distill, regression_runs=()).longest_regression_run is None


def test_recipe_search_scales_with_the_profile_and_is_off_for_the_paper_recipe(smoke_profile):
    distill = replace(smoke_profile.distill, recipe_variants=None)
    variants = recipe_search(distill)
    assert list(recipe_search(replace(distill, recipe_variants=2))) == list(variants)[:2]
    assert variants["the same, 1.4x the steps"]["steps"] == distill.steps * 7 // 5
    assert variants[f"the same, training seed {distill.seeds[1]}"]["seed"] == distill.seeds[1]
    assert variants[f"recipe at batch {2 * distill.batch_size} for half the steps"] == {
        "batch_size": 2 * distill.batch_size, "steps": distill.steps // 2}
    assert recipe_search(replace(distill, recipe_variants=0)) == {}
    stages = recipe_stages(distill)
    assert list(stages) == list(variants)  # one stage per variant, in the search's order
    assert [stages[name] for name in ("the first tiny recipe", "the same, 1.4x the steps", "recipe + guidance 4.5",
                                      "recipe + DMD regression loss 1 (512 teacher pairs)")] == [
        FIRST_RECIPE, COMBINATIONS, RECIPE, DMD_REGRESSION]
    dmd = [variants[name] for name, stage in stages.items() if stage == DMD_REGRESSION]
    assert dmd and all(v["regression_weight"] > 0 and v["regression_pairs"] > 0 for v in dmd)
    warmups = [variants[name] for name, stage in stages.items() if stage == REGRESSION_WARMUP]
    assert [v.get("student_method", "lorad") for v in warmups] == ["lorad", "full"] + ["lorad"] * 7
    for warmup in warmups:  # the fit, then as many VSD steps as the recipe's
        assert warmup["steps"] - warmup["regression_warmup_steps"] == distill.steps
        assert warmup["regression_pairs"] > 0
        student_config(distill, "lorad", **warmup)  # a valid config
    # the regression loss stays off after the fit but in one variant; one variant at twice the recipe's LoRaD rank
    assert [w.get("regression_weight", 0.0) for w in warmups].count(1.0) == 1
    assert [w.get("student_rank") for w in warmups if w.get("student_method") != "full"].count(
        2 * distill.student_rank) == 1
    assert list(recipe_stages(replace(distill, recipe_variants=3))) == list(variants)[:3]
    study = recipe_study(smoke_profile, load_backbone(smoke_profile.backbone), {}, counting_score()[0], {},
                         progress=False)
    assert study.empty and study.index.name == "variant"
