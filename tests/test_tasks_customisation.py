"""Notebook 05 §3–4 (wadi_core.tasks.reversion, wadi_core.tasks.dreambooth): a relation token learned in a frozen
text encoder (ReVersion) and DreamBooth-style customisation with LoRaD / LoRA / DoRA at equal parameters. Runs on
the random-weight SD1.5-structured pipeline and the smoke profile, in temporary directories."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from wadi_core.adapters import count_trainable, inject
from wadi_core.tasks import dreambooth as db
from wadi_core.tasks import reversion as rv
from wadi_core.world import COLORS, make_split
from wadi_core.world.render import render_scene
from wadi_core.world.scenes import Scene, ShapesObject


@pytest.fixture(scope="module")
def world(sd15_smoke_student):
    """(profile, the SD1.5-structured smoke backbone, a frozen LoRaD student with non-zero adapters)."""
    profile, backbone, student = sd15_smoke_student
    return profile, backbone, copy.deepcopy(student).requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Relation inversion
# --------------------------------------------------------------------------------------------------------------


def test_relation_exemplars_are_above_scenes_with_the_placeholder(world):
    profile, backbone, _ = world
    images, pairs, captions = rv.relation_exemplars(profile.reversion, backbone.resolution)
    assert images.shape == (profile.reversion.exemplars, 3, backbone.resolution, backbone.resolution)
    assert images.dtype == torch.uint8 and len(pairs) == len(captions) == len(images)
    assert all(f" {profile.reversion.token} " in c for c in captions)
    again = rv.relation_exemplars(profile.reversion, backbone.resolution)
    assert torch.equal(images, again[0]) and pairs == again[1]
    held_out = rv.held_out_pairs(pairs, 20, seed=0)
    assert len(held_out) == 20 and not set(held_out) & set(pairs) and all(a != b for a, b in held_out)


def test_placeholder_is_one_new_token_and_the_original_is_untouched(world):
    _, backbone, _ = world
    vocabulary = len(backbone.tokenizer)
    placed, token_id = rv.with_placeholder(backbone, "<R>", "the")
    assert len(placed.tokenizer) == vocabulary + 1 and len(backbone.tokenizer) == vocabulary
    ids = placed.tokenizer("a red circle <R> a blue square").input_ids
    assert ids.count(token_id) == 1
    table = placed.text_encoder.get_input_embeddings().weight
    the = placed.tokenizer("the", add_special_tokens=False).input_ids[0]
    assert torch.equal(table[token_id], table[the])
    assert backbone.text_encoder.get_input_embeddings().weight.shape[0] == vocabulary
    assert placed.denoiser is backbone.denoiser


@pytest.mark.parametrize("token", ["red", "the"])
def test_placeholder_already_in_the_vocabulary_is_named(world, token):
    _, backbone, _ = world
    with pytest.raises(ValueError, match=f"placeholder token '{token}' already exists"):
        rv.with_placeholder(backbone, token, "the")


def test_relation_focal_timesteps_favour_high_noise():
    t = rv.relation_focal_timesteps(20_000, 1000, 0.5, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    high, low = (t >= 500).float().mean().item(), (t < 500).float().mean().item()
    # f(t) ∝ 1 − 0.5 cos(πt/T): the upper half holds (1 + 1/π)/2 ≈ 0.659 of the mass
    assert abs(high - (1 + 1 / np.pi) / 2) < 0.02 and high > low
    with pytest.raises(ValueError, match="focal alpha"):
        rv.relation_focal_timesteps(4, 1000, 1.5, torch.Generator())


def test_steering_loss_is_low_when_the_token_sits_on_the_positives():
    table = torch.eye(4) + 0.01
    near = rv.steering_loss(table, 0, [0], [2, 3], temperature=0.07)  # the anchor is its own positive
    far = rv.steering_loss(table, 0, [1], [0], temperature=0.07)  # the anchor is its own negative
    assert near < 0.01 < far
    with pytest.raises(ValueError, match="at least one positive"):
        rv.steering_loss(table, 0, [], [1], 0.07)


@pytest.mark.parametrize("through_student", [False, True])
def test_train_relation_token_moves_only_its_row(world, through_student):
    profile, backbone, student = world
    config = dataclasses.replace(profile.reversion, steps=3, batch_size=2)
    images, _, captions = rv.relation_exemplars(config, backbone.resolution)
    teacher_before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    table_before = backbone.text_encoder.get_input_embeddings().weight.clone()
    token, log = rv.train_relation_token(backbone, images, captions, config, steering=True,
                                         student=student if through_student else None, progress=False)
    assert log["step"] == [0.0, 1.0, 2.0] and all(np.isfinite(log["loss"])) and all(s > 0 for s in log["steering"])
    placed, token_id = rv.with_placeholder(backbone, config.token, config.initializer)
    start = placed.text_encoder.get_input_embeddings().weight[token_id]
    assert not torch.allclose(token.embedding, start)  # the token learned
    assert torch.equal(backbone.text_encoder.get_input_embeddings().weight, table_before)
    for k, v in backbone.denoiser.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    learned = rv.with_token_embedding(backbone, config.token, token.embedding)
    assert torch.equal(learned.text_encoder.get_input_embeddings().weight[token_id], token.embedding)


def test_load_or_train_relation_token_round_trip_and_errors(world):
    profile, backbone, student = world
    first = rv.load_or_train_relation_token(profile, backbone, "teacher, no steering", progress=False)
    again = rv.load_or_train_relation_token(profile, backbone, "teacher, no steering", progress=False)
    assert first.trained and not again.trained and torch.equal(first.model.embedding, again.model.embedding)
    measured_more = dataclasses.replace(
        profile, reversion=dataclasses.replace(profile.reversion, eval_pairs=99, eval_seeds=3, timing_images=7))
    assert not rv.load_or_train_relation_token(measured_more, backbone, "teacher, no steering", progress=False).trained
    dropped = rv.load_or_train_relation_token(profile, backbone, "teacher, no opposite positive", progress=False)
    assert dropped.trained and "below" in profile.reversion.positives
    assert dropped.config.positives == tuple(w for w in profile.reversion.positives if w != "below")
    with pytest.raises(ValueError, match="unknown variant"):
        rv.load_or_train_relation_token(profile, backbone, "vae")
    with pytest.raises(ValueError, match="pass student="):
        rv.load_or_train_relation_token(profile, backbone, "student")


def test_relation_scores_read_rendered_relations(smoke_profile):
    from wadi_core.eval import load_or_train_feature_net

    reader = load_or_train_feature_net(smoke_profile).model
    config = dataclasses.replace(smoke_profile.reversion, exemplars=6)
    images, pairs, _ = rv.relation_exemplars(config, 32)
    scores = rv.relation_scores(reader, images.float() / 255, pairs)
    assert set(scores) == {"relation", "entities", "relation given both found", "reversed"}
    assert all(0 <= v <= 1 for v in scores.values() if v == v)
    swapped = rv.relation_scores(reader, images.float() / 255, [(b, a) for a, b in pairs])
    assert swapped["reversed"] == scores["relation"] and swapped["relation"] == scores["reversed"]
    with pytest.raises(ValueError, match="'near'"):
        rv.relation_scores(reader, images.float() / 255, pairs, relation="near")


# --------------------------------------------------------------------------------------------------------------
# DreamBooth
# --------------------------------------------------------------------------------------------------------------


def test_rare_token_is_one_unused_token(world):
    _, backbone, _ = world
    captions = make_split("train", world[0].world).captions
    token = db.rare_token(backbone.tokenizer, captions)
    ids = backbone.tokenizer(token, add_special_tokens=False).input_ids
    assert len(ids) == 1 and not any(token in c.split() for c in captions)
    db.check_subject_token(backbone.tokenizer, token, f"a {token} square", backbone.max_length)


def test_bad_subject_tokens_are_named(world):
    _, backbone, _ = world
    tokenizer = backbone.tokenizer
    long_word = "qzxv" * 3
    with pytest.raises(ValueError, match=f"subject token '{long_word}' is"):
        db.check_subject_token(tokenizer, long_word, f"a {long_word} square", backbone.max_length)
    prompt = "a red square " * backbone.max_length
    with pytest.raises(ValueError, match="longer than the tokenizer's"):
        db.check_subject_token(tokenizer, "red", prompt, backbone.max_length)


def test_cross_is_drawn_and_the_exemplar_folder_round_trips(world, tmp_path):
    profile, backbone, _ = world
    images = db.subject_exemplars(profile.dreambooth, backbone.resolution)
    assert images.shape == (profile.dreambooth.exemplars, 3, 32, 32) and images.dtype == torch.uint8
    cross = render_scene(Scene(objects=(ShapesObject("red", "cross", 16, 16, 8),), caption=""))
    assert cross[16, 16].max() > 200 and cross[9, 9].max() < 30  # centre filled, corner between the arms empty
    db.write_exemplars(images, tmp_path / "subject")
    assert torch.equal(db.load_exemplars(tmp_path / "subject", backbone.resolution), images)


def test_bad_exemplar_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        db.load_exemplars(tmp_path / "empty", 32)
    db.write_exemplars(torch.zeros(2, 3, 48, 48, dtype=torch.uint8), tmp_path / "big")
    with pytest.raises(ValueError, match="is 48×48 pixels; the backbone takes 32×32"):
        db.load_exemplars(tmp_path / "big", 32)


@pytest.mark.parametrize("method", ["lorad", "lora", "dora"])
def test_adapter_parameters_equal_what_inject_adds(world, method):
    _, backbone, _ = world
    model = db.plain_copy(backbone.denoiser)
    inject(model, method, 3)
    assert count_trainable(model) == db.adapter_parameters(backbone.denoiser, method, 3)


def test_matched_ranks_are_nearest_to_lorad(world):
    _, backbone, _ = world
    ranks = db.matched_ranks(backbone.denoiser, 4, ("lorad", "lora", "dora"))
    target = ranks["lorad"][1]
    assert ranks["lorad"][0] == 4
    for method in ("lora", "dora"):
        rank, count = ranks[method]
        for other in (rank - 1, rank + 1):
            if other >= 1:
                assert abs(count - target) <= abs(db.adapter_parameters(backbone.denoiser, method, other) - target)


@pytest.mark.parametrize("one_step", [False, True])
def test_train_dreambooth_adapts_a_copy(world, one_step):
    profile, backbone, student = world
    base = db.plain_copy(student) if one_step else backbone.denoiser
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = dataclasses.replace(profile.dreambooth, steps=3, batch_size=2)
    exemplars = db.subject_exemplars(config, backbone.resolution)
    prior = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    token = db.rare_token(backbone.tokenizer, make_split("train", profile.world).captions)
    model, log = db.train_dreambooth(base, backbone, "lorad", 2, exemplars, token, prior,
                                     db.class_prompts(config, 4), config, lr=1e-2, one_step=one_step, progress=False)
    assert log["step"] == [0.0, 1.0, 2.0] and all(np.isfinite(log["loss"]))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    change = db.adapter_weight_change(base, model)
    assert change["direction change"] > 0 and change["norm change"] < 1e-5  # LoRaD rotates: norms are kept
    assert change["trainable parameters"] == db.adapter_parameters(base, "lorad", 2)


def test_load_or_train_dreambooth_round_trip(world):
    profile, backbone, _ = world
    exemplars = db.subject_exemplars(profile.dreambooth, backbone.resolution)
    token = db.rare_token(backbone.tokenizer, make_split("train", profile.world).captions)
    args = (profile, backbone, backbone.denoiser, "teacher", "lora", 2, exemplars, token, 1e-3)
    first, again = db.load_or_train_dreambooth(*args, progress=False), db.load_or_train_dreambooth(*args)
    assert first.trained and not again.trained
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    measured_more = dataclasses.replace(profile, dreambooth=dataclasses.replace(
        profile.dreambooth, subject_images=profile.dreambooth.subject_images + 8, eval_seeds=3))
    assert not db.load_or_train_dreambooth(measured_more, *args[1:]).trained  # evaluation settings do not retrain
    with pytest.raises(ValueError, match="unknown base"):
        db.load_or_train_dreambooth(profile, backbone, backbone.denoiser, "vae", "lora", 2, exemplars, token, 1e-3)


def test_color_and_position_read_rendered_objects():
    images, wanted = [], []
    for i, (color, (cx, cy, region)) in enumerate(zip(COLORS, [(10, 10, "top left"), (22, 10, "top right"),
                                                              (10, 22, "bottom left"), (16, 16, "center")])):
        scene = Scene(objects=(ShapesObject(color, "cross", cx, cy, 5),), caption="")
        images.append(torch.from_numpy(render_scene(scene)).permute(2, 0, 1).float() / 255)
        wanted.append((color, region))
    images = torch.stack(images)
    assert db.color_and_position(images) == wanted
    assert db.prompt_fidelity(images, wanted) == {"colour": 1.0, "position": 1.0, "colour and position": 1.0}
    assert db.color_and_position(torch.zeros(1, 3, 32, 32)) == [(None, None)]


def test_subject_similarity_prefers_the_subject(smoke_profile):
    from wadi_core.eval import load_or_train_feature_net

    reader = load_or_train_feature_net(smoke_profile).model
    exemplars = db.subject_exemplars(smoke_profile.dreambooth, 32)
    same = db.subject_similarity(reader, exemplars.float() / 255, exemplars)
    assert same.shape == (len(exemplars),) and torch.all(same <= 1 + 1e-5)


def test_cross_rate_reads_the_subject_and_no_world_shape(smoke_profile):
    exemplars = db.subject_exemplars(dataclasses.replace(smoke_profile.dreambooth, exemplars=64), 32)
    assert db.cross_rate(exemplars.float() / 255) == 1.0
    real = make_split("coco14-like", smoke_profile.world).images_float() / 2 + 0.5
    assert db.cross_rate(real) <= 0.01
    for shape in ("square", "circle", "triangle"):
        scene = Scene(objects=(ShapesObject("red", shape, 16, 16, 8),), caption="")
        image = torch.from_numpy(render_scene(scene)).permute(2, 0, 1)[None].float() / 255
        assert db.cross_rate(image) == 0.0, shape
    cells = db.cross_cells(torch.zeros(2, 3, 32, 32))
    assert cells.shape == (2, 3, 3) and not cells.any()
