"""The tiny backbone: SD1.5 schedule, sampling, one-step formula, train → save → load round trips."""

import dataclasses

import pytest
import torch

from wadi_core import artifacts
from wadi_core.adapters import linear_weight_share
from wadi_core.backbones import Backbone, load_backbone, make_scheduler, sample_ddim
from wadi_core.backbones.tiny import (
    _tokenizer_files,
    _tokenizer_from_files,
    cosine_lr,
    load_or_train_teacher,
    load_or_train_tiny_clip,
    text_encoder_from_clip,
    tokenize,
    train_tokenizer,
)
from wadi_core.eval import cached_samples
from wadi_core.profiles import get_profile
from wadi_core.world import make_split


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    """The smoke profile's CLIP and teacher, trained once into a temporary data directory."""
    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_DATA_DIR", str(data))
        mp.delenv("WADI_FRESH", raising=False)
        mp.delenv("WADI_NO_TRAIN", raising=False)
        profile = get_profile("smoke")
        clip = load_or_train_tiny_clip(profile)
        teacher = load_or_train_teacher(profile, clip)
    return profile, data, clip, clip.tokenizer, teacher


def test_scheduler_is_sd15s():
    scheduler = make_scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.alphas_cumprod[999].item() == pytest.approx(0.0047, abs=5e-5)
    assert (1 / scheduler.alphas_cumprod[999].sqrt()).item() == pytest.approx(14.6, abs=0.05)


def test_cosine_schedule_endpoints():
    assert cosine_lr(0, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)


def test_round_trip_loads_the_same_weights(smoke_models, monkeypatch):
    profile, data, clip, tokenizer, teacher = smoke_models
    assert clip.trained and teacher.trained
    monkeypatch.setenv("WADI_DATA_DIR", str(data))
    monkeypatch.setenv("WADI_NO_TRAIN", "1")  # must load, never retrain
    clip2 = load_or_train_tiny_clip(profile)
    teacher2 = load_or_train_teacher(profile, clip2)
    assert not clip2.trained and not teacher2.trained
    assert clip2.tokenizer.get_vocab() == tokenizer.get_vocab()
    for a, b in ((clip.model, clip2.model), (teacher.model, teacher2.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for first, again in ((clip, clip2), (teacher, teacher2)):
        assert list(again.log.columns) == list(first.log.columns) and again.log.equals(first.log)
    assert list(teacher.log.columns) == ["step", "loss", "lr", "seconds"]
    assert teacher.log["step"].tolist() == list(range(profile.teacher.steps))
    assert teacher.config == profile.teacher and clip.config == profile.clip
    assert teacher2.trainable_parameters == 0 and teacher2.status().startswith("UNet2DConditionModel: loaded")


def test_tokenizer_survives_its_round_trip_through_the_checkpoint():
    profile = get_profile("smoke")
    captions = make_split("train", profile.world).captions
    trained = train_tokenizer(captions, profile.clip)
    restored = _tokenizer_from_files(_tokenizer_files(trained))
    assert torch.equal(tokenize(restored, captions + [""]), tokenize(trained, captions + [""]))


def test_changed_config_is_not_silently_retrained(smoke_models, monkeypatch):
    profile, data, *_ = smoke_models
    monkeypatch.setenv("WADI_DATA_DIR", str(data))
    monkeypatch.setenv("WADI_NO_TRAIN", "1")
    other = dataclasses.replace(profile, clip=dataclasses.replace(profile.clip, steps=profile.clip.steps + 1))
    with pytest.raises(artifacts.ArtifactError, match="FRESH=1 make reproduce"):
        load_or_train_tiny_clip(other)


def test_corrupt_checkpoint_raises(smoke_models, monkeypatch, tmp_path):
    profile, data, clip, *_ = smoke_models
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path))
    broken = tmp_path / clip.path.name
    broken.write_bytes(clip.path.read_bytes()[:100])
    with pytest.raises(artifacts.ArtifactError, match="readable safetensors.*ONLY=00"):
        load_or_train_tiny_clip(profile)


def _tiny(tokenizer, text_encoder, unet, scheduler, clip) -> Backbone:
    return Backbone("tiny", tokenizer, text_encoder, unet, scheduler, max_length=tokenizer.model_max_length, clip=clip)


def test_sampling_is_seeded_and_batch_size_invariant(smoke_models):
    _, _, clip, tokenizer, teacher = smoke_models
    backbone = _tiny(tokenizer, text_encoder_from_clip(clip.model), teacher.model, make_scheduler(), clip.model)
    prompts = ["a red circle", "a blue square left of a green triangle", "a small yellow triangle", "a green square"]
    a = backbone.sample(prompts, 3, 2.0, seed=7, batch_size=4, progress=False)
    b = backbone.sample(prompts, 3, 2.0, seed=7, batch_size=3, progress=False)
    c = backbone.sample(prompts, 3, 2.0, seed=8, batch_size=4, progress=False)
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c)


def test_one_step_is_the_x0_formula(smoke_models):
    _, _, clip, tokenizer, teacher = smoke_models
    scheduler = make_scheduler()
    backbone = _tiny(tokenizer, text_encoder_from_clip(clip.model), teacher.model, scheduler, clip.model)
    prompts = ["a red circle", "a green square"]
    image = backbone.one_step(prompts, seed=3)
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eps = teacher.model(z, 999, encoder_hidden_states=backbone.encode_prompts(prompts)).sample
    alpha_bar = scheduler.alphas_cumprod[999]
    x0 = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    torch.testing.assert_close(image, (x0.clamp(-1, 1) + 1) / 2)


def test_ddim_with_one_step_and_no_guidance_matches_manual_formula(smoke_models):
    _, _, clip, tokenizer, teacher = smoke_models
    encoder = text_encoder_from_clip(clip.model)
    backbone = _tiny(tokenizer, encoder, teacher.model, make_scheduler(), clip.model)
    states, null = backbone.encode_prompts(["a red circle"]), backbone.null_embedding()
    assert states.shape == (1, tokenizer.model_max_length, clip.model.config.text_config.hidden_size)
    guided = sample_ddim(teacher.model, make_scheduler(), states, null, 1, 3.0, seed=1, progress=False)
    plain = sample_ddim(teacher.model, make_scheduler(), states, null, 1, 1.0, seed=1, progress=False)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="tiny, tiny-smoke, tiny-pixel, tiny-pixel-smoke, sd15"):
        load_backbone("sd3")


def test_linear_weight_share_counts_the_student_rules_linears(smoke_models):
    teacher = smoke_models[4].model
    adapted = sum(m.weight.numel() for n, m in teacher.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks"))
    assert linear_weight_share(teacher) == adapted / sum(p.numel() for p in teacher.parameters())


def test_teacher_samples_are_cached_bit_for_bit(smoke_models, monkeypatch, tmp_path):
    _, _, clip, tokenizer, teacher = smoke_models
    backbone = _tiny(tokenizer, text_encoder_from_clip(clip.model), teacher.model, make_scheduler(), clip.model)
    prompts = ["a red circle", "a blue square left of a green triangle", "a small yellow triangle"]
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("WADI_FRESH", raising=False)
    monkeypatch.delenv("WADI_NO_TRAIN", raising=False)
    fresh = backbone.sample(prompts, 3, 2.0, seed=5, progress=False)
    first = cached_samples(backbone, prompts, 3, 2.0, seed=5)
    assert first.sampled and first.path.parent == tmp_path and first.path.name.startswith("samples-")
    assert first.images.dtype == torch.float32 and torch.equal(first.images, fresh)
    monkeypatch.setenv("WADI_NO_TRAIN", "1")  # must load, never sample
    again = cached_samples(backbone, prompts, 3, 2.0, seed=5)
    assert not again.sampled and again.path == first.path and torch.equal(again.images, fresh)
    assert again.seconds == first.seconds and "loaded from the cache" in again.status()
    assert first.path.name in artifacts.read_checksums(tmp_path)
    for changed in (dict(prompts=prompts[:2]), dict(num_inference_steps=2), dict(guidance_scale=1.5),
                    dict(seed=6)):
        args = {**dict(prompts=prompts, num_inference_steps=3, guidance_scale=2.0, seed=5), **changed}
        with pytest.raises(artifacts.ArtifactError, match="WADI_NO_TRAIN"):
            cached_samples(backbone, **args)
    monkeypatch.setenv("WADI_NO_TRAIN", "0")
    monkeypatch.setenv("WADI_FRESH", "1")
    artifacts._WRITTEN_THIS_PROCESS.discard(first.path.resolve())  # as if an earlier run had cached it
    redone = cached_samples(backbone, prompts, 3, 2.0, seed=5)
    assert redone.sampled and torch.equal(redone.images, fresh)
    assert not cached_samples(backbone, prompts, 3, 2.0, seed=5).sampled  # sampled once per fresh run
