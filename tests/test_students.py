"""Cached tiny-world students (wadi_core.distill.students): recipe per method, train → save → load round trip,
one-step generation, export as a vanilla diffusers U-Net, cached prompt embeddings. Uses the smoke profile
(5-step teacher, 3-step students) in a temporary data directory."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from wadi_core import artifacts
from wadi_core.adapters import adapter_config, adapter_modules, count_trainable, merged_copy
from wadi_core.backbones import load_tiny_backbone
from wadi_core.backbones.counts import count_adapter_parameters
from wadi_core.distill import (
    STUDENT_METHODS,
    VSDConfig,
    export_student,
    load_or_train_student,
    one_step_generate,
    prompt_embeddings,
    student_config,
)
from wadi_core.distill.vsd import LOG_COLUMNS
from wadi_core.profiles import get_profile


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Smoke profile, its backbone and a trained LoRaD student, in temporary data/cache directories."""
    root = tmp_path_factory.mktemp("students")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_DATA_DIR", str(root / "data"))
        mp.setenv("WADI_CACHE_DIR", str(root / "cache"))
        mp.delenv("WADI_FRESH", raising=False)
        mp.delenv("WADI_NO_TRAIN", raising=False)
        profile = get_profile("smoke")
        backbone = load_tiny_backbone(profile)
        student = load_or_train_student(profile, backbone, "lorad", progress=False)
    return profile, backbone, student, root


@pytest.fixture
def env(smoke, monkeypatch):
    root = smoke[3]
    monkeypatch.setenv("WADI_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("WADI_CACHE_DIR", str(root / "cache"))
    monkeypatch.delenv("WADI_FRESH", raising=False)
    return monkeypatch


def test_student_config_takes_method_rank_and_lr_from_the_profile():
    distill = get_profile("tiny").distill
    lrs = dict(distill.student_lrs)
    assert set(lrs) == set(STUDENT_METHODS)
    wadi = student_config(distill, "lorad")
    assert (wadi.student_method, wadi.student_rank, wadi.student_lr) == ("lorad", distill.student_rank, lrs["lorad"])
    fake = (distill.fake_method, distill.fake_rank, distill.fake_lr)
    assert (wadi.fake_method, wadi.fake_rank, wadi.fake_lr) == fake
    assert student_config(distill, "lora").student_rank == distill.baseline_rank
    assert student_config(distill, "lorad", rank=5).student_rank == 5
    assert student_config(distill, "full").student_lr == lrs["full"]
    assert student_config(distill, "lorad", fake_updates_per_step=1).fake_updates_per_step == 1


def test_latent_profile_recipe_holds_the_papers_shares_and_its_named_deviations():
    profile = get_profile("tiny")
    assert profile.backbone == "tiny"
    unet = UNet2DConditionModel.from_pretrained(artifacts.REPO_ROOT / "data" / "tiny_sd" / "unet")
    wadi, lora = (student_config(profile.distill, method) for method in ("lorad", "lora"))
    _, wadi_count, total = count_adapter_parameters(unet, "lorad", wadi.student_rank)
    _, lora_count, _ = count_adapter_parameters(unet, "lora", lora.student_rank)
    assert wadi_count / total == pytest.approx(0.0975, abs=0.002)  # paper: 83.8 M of SD1.5's 859.5 M
    assert 1.3 < lora_count / wadi_count < 1.5  # paper's adapter ablation: 1.44×
    assert (wadi.fake_method, wadi.fake_guidance_scale, wadi.guidance_scale) == ("full", 1.0, 3.0)


def test_paper_profile_distill_recipe_is_the_official_loop():
    from wadi_core.profiles import _paper

    distill = _paper().distill
    config = student_config(distill, "lorad")
    paper = VSDConfig()
    for name in ("student_rank", "fake_method", "fake_rank", "student_lr", "fake_lr", "batch_size", "steps",
                 "guidance_scale", "fake_guidance_scale", "fake_warmup_steps", "fake_updates_per_step",
                 "normalize_generator_grad", "ema_decay"):
        assert getattr(config, name) == getattr(paper, name), name


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="vera"), "unknown student method"),
    (dict(method="lorad", learning_rate=1.0), "unknown VSDConfig field"),
])
def test_student_config_errors(kwargs, message):
    distill = get_profile("tiny").distill
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=message):
        student_config(distill, method, **kwargs)


def test_trained_student_round_trips_through_the_cache(smoke, env):
    profile, backbone, trained, _ = smoke
    assert trained.trained and trained.path.name.startswith("student-")
    assert list(trained.log["step"]) == list(range(1, profile.distill.steps + 1))
    env.setenv("WADI_NO_TRAIN", "1")  # must load, never retrain
    loaded = load_or_train_student(profile, backbone, "lorad", progress=False)
    assert not loaded.trained and loaded.path == trained.path
    assert adapter_config(loaded.model).rank == profile.distill.student_rank
    want = {n: p for n, p in trained.model.named_parameters()}
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, want[name]), name
    assert loaded.log["generator_loss"].tolist() == trained.log["generator_loss"].tolist()
    assert loaded.trainable_parameters == trained.trainable_parameters > 0


def test_another_recipe_is_not_silently_loaded_or_trained(smoke, env):
    profile, backbone, _, _ = smoke
    env.setenv("WADI_NO_TRAIN", "1")
    with pytest.raises(artifacts.ArtifactError, match="WADI_NO_TRAIN"):
        load_or_train_student(profile, backbone, "lorad", student_lr=5e-4, progress=False)


def test_student_is_a_trained_model_with_its_recipe(smoke):
    profile, _, trained, _ = smoke
    assert isinstance(trained, artifacts.TrainedModel)
    assert trained.config == student_config(profile.distill, "lorad")
    assert trained.status() == f"lorad student: trained now and saved as {trained.path.name}"
    assert list(trained.log.columns)[0] == "step" and set(trained.log.columns) == set(LOG_COLUMNS)


def test_a_corrupt_or_damaged_student_names_notebook_03(smoke, env, tmp_path):
    profile, backbone, trained, _ = smoke
    env.setenv("WADI_DATA_DIR", str(tmp_path))
    copy = tmp_path / trained.path.name
    copy.write_bytes(trained.path.read_bytes()[:100])
    with pytest.raises(artifacts.ArtifactError, match="readable safetensors.*ONLY=03"):
        load_or_train_student(profile, backbone, "lorad", progress=False)
    damaged = bytearray(trained.path.read_bytes())
    damaged[-1] ^= 1  # one bit of the last tensor; the header still parses
    copy.write_bytes(bytes(damaged))
    (tmp_path / artifacts.CHECKSUMS).write_text(f"{artifacts.file_sha256(trained.path)}  {copy.name}\n")
    with pytest.raises(artifacts.ArtifactError, match="download is damaged.*ONLY=03"):
        load_or_train_student(profile, backbone, "lorad", progress=False)


def test_merged_copy_is_a_plain_unet_and_leaves_the_student_alone(smoke, env):
    _, backbone, trained, _ = smoke
    before = {name: tensor.clone() for name, tensor in trained.model.state_dict().items()}
    merged = merged_copy(trained.model)
    assert adapter_config(merged) is None and not adapter_modules(merged)
    assert set(merged.state_dict()) == set(backbone.denoiser.state_dict())
    assert adapter_config(trained.model) is not None and adapter_modules(trained.model)
    assert trained.model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in trained.model.state_dict().items())
    prompts = ["a yellow square", "a red circle left of a blue triangle"]
    torch.testing.assert_close(one_step_generate(merged, backbone, prompts, seed=1),
                               one_step_generate(trained.model, backbone, prompts, seed=1), rtol=1e-4, atol=1e-5)


def test_one_step_generation_at_identity_is_the_teachers_one_step_image(smoke, env):
    profile, backbone, trained, _ = smoke
    prompts = ["a red circle", "a small blue square", "a green triangle", ""]
    teacher_images = backbone.one_step(prompts, seed=3)
    torch.testing.assert_close(one_step_generate(backbone.denoiser, backbone, prompts, seed=3), teacher_images)
    # Batch size does not change the images (noise is drawn up front).
    a = one_step_generate(trained.model, backbone, prompts, seed=3, batch_size=4)
    b = one_step_generate(trained.model, backbone, prompts, seed=3, batch_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # float32 batching noise ×14.6
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1


def test_export_is_a_vanilla_unet_with_the_students_outputs(smoke, env, tmp_path):
    _, backbone, trained, _ = smoke
    folder = export_student(trained.model, backbone, tmp_path / "export")
    vanilla = UNet2DConditionModel.from_pretrained(folder).eval()
    assert count_trainable(trained.model) > 0  # the student itself keeps its adapters
    assert set(vanilla.state_dict()) == set(backbone.denoiser.state_dict())
    prompts = ["a yellow square", "a red circle left of a blue triangle"]
    torch.testing.assert_close(one_step_generate(vanilla, backbone, prompts, seed=1),
                               one_step_generate(trained.model, backbone, prompts, seed=1), rtol=1e-4, atol=1e-5)


def test_full_student_round_trips(smoke, env):
    profile, backbone, _, _ = smoke
    full = load_or_train_student(profile, backbone, "full", progress=False)
    assert full.trainable_parameters == sum(p.numel() for p in backbone.denoiser.parameters())
    env.setenv("WADI_NO_TRAIN", "1")
    again = load_or_train_student(profile, backbone, "full", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), again.model.parameters()))


def test_prompt_embeddings_are_cached_and_equal(smoke, env):
    _, backbone, _, root = smoke
    prompts = ["a red circle", "a blue square", "a green triangle"]
    first = prompt_embeddings(backbone, prompts, batch_size=2)
    files = list((root / "cache" / "embeddings").glob("*.safetensors"))
    assert files
    torch.testing.assert_close(prompt_embeddings(backbone, prompts), first, rtol=0, atol=0)
    torch.testing.assert_close(first, backbone.encode_prompts(prompts))


def test_student_hash_changes_with_the_recipe():
    distill = get_profile("smoke").distill
    other = dataclasses.replace(distill, fake_updates_per_step=1)
    hashes = {artifacts.config_hash(student_config(recipe, "lorad")) for recipe in (distill, other)}
    assert len(hashes) == 2
