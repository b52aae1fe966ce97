"""The latent tiny world at smoke size: VAE latents, a latent teacher in SD1.5's pattern, the three saved as a
stock StableDiffusionPipeline folder that the one Backbone loads ("tiny-smoke"; the pixel world is "tiny-pixel-smoke"),
the folder rebuilt when stale, and the errors for latents, denoisers and students of the other world."""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from wadi_core import artifacts
from wadi_core.adapters import inject
from wadi_core.artifacts import checkpoint_tensors, data_dir, load_weights_strict
from wadi_core.backbones import (
    PipelineLoadError,
    backbone_names,
    load_backbone,
    load_or_train_teacher,
    load_or_train_tiny_clip,
    make_scheduler,
)
from wadi_core.backbones import tiny_sd as tiny_sd_module
from wadi_core.backbones.denoisers import check_denoiser_matches, load_denoiser
from wadi_core.backbones.tiny_sd import (
    SOURCES_FILE,
    encode_latents,
    load_or_build_tiny_sd_folder,
    load_or_train_latent_teacher,
    save_tiny_sd_pipeline,
    tiny_sd_folder,
)
from wadi_core.backbones.tiny_vae import load_or_train_tiny_vae
from wadi_core.distill import export_student, one_step_generate
from wadi_core.eval import attribute_accuracy, load_or_train_feature_net
from wadi_core.profiles import get_profile
from wadi_core.world import make_split


@pytest.fixture(scope="module")
def tiny_sd(smoke_profile, tmp_path_factory):
    clip = load_or_train_tiny_clip(smoke_profile)
    vae = load_or_train_tiny_vae(smoke_profile)
    teacher = load_or_train_latent_teacher(smoke_profile, clip, vae)
    folder = save_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd", clip, vae.model, teacher.model)
    return smoke_profile, clip, vae, teacher, folder


def test_latent_teacher_has_sd15s_attention_pattern(tiny_sd):
    _, _, _, teacher, _ = tiny_sd
    config = teacher.model.config
    assert list(config.down_block_types) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config.in_channels == 4 and config.sample_size == 16
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"


def test_latents_are_scaled_posterior_means(tiny_sd):
    profile, _, vae, _, _ = tiny_sd
    images = torch.zeros(2, 3, profile.world.resolution, profile.world.resolution)
    expected = vae.model.encode(images).latent_dist.mean * vae.model.config.scaling_factor
    torch.testing.assert_close(encode_latents(vae.model, images), expected)


def test_the_folder_is_a_stock_pipeline_and_a_backbone(tiny_sd, monkeypatch):
    _, _, vae, teacher, folder = tiny_sd
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
    backbone = load_backbone(folder, device="cpu")
    assert backbone.latent_shape == (4, 16, 16) and backbone.resolution == 32
    assert backbone.vae.config.scaling_factor == vae.model.config.scaling_factor
    for name, tensor in teacher.model.state_dict().items():
        assert torch.equal(backbone.denoiser.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------
# The two tiny worlds' names, and the profile's bundled pipeline folder
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent(smoke_profile):
    return load_backbone("tiny-smoke")


@pytest.fixture(scope="module")
def pixel(smoke_profile):
    return load_backbone("tiny-pixel-smoke")


def test_tiny_smoke_is_the_latent_tiny_sd_from_its_folder(tiny_sd, latent):
    profile, clip, _, teacher, _ = tiny_sd
    assert latent.name == "tiny-smoke" and latent.pipeline_class == "StableDiffusionPipeline"
    assert latent.vae is not None and latent.latent_shape == (4, 16, 16) and latent.resolution == 32
    assert (latent.student_rank, latent.fake_rank) == (profile.distill.student_rank, profile.distill.fake_rank)
    assert latent.clip is not None and latent.device.type == "cpu"
    assert tiny_sd_folder(profile) == data_dir() / "tiny_sd-smoke"
    assert (tiny_sd_folder(profile) / "model_index.json").is_file()
    for name, tensor in teacher.model.state_dict().items():
        assert torch.equal(latent.denoiser.state_dict()[name], tensor), name
    for name, tensor in clip.model.state_dict().items():
        assert torch.equal(latent.clip.state_dict()[name], tensor), name


def test_tiny_pixel_smoke_is_the_pixel_world_that_world_study_compares(tiny_sd, pixel):
    profile, clip, *_ = tiny_sd
    assert profile.backbone == "tiny-smoke" and get_profile("tiny").backbone == "tiny"
    assert pixel.name == "tiny-pixel-smoke" and pixel.vae is None and pixel.pipeline_class is None
    assert pixel.latent_shape == (3, 32, 32)
    teacher = load_or_train_teacher(profile, clip)
    for name, tensor in teacher.model.state_dict().items():
        assert torch.equal(pixel.denoiser.state_dict()[name], tensor), name
    prompts = ["a red circle", "a green square"]
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eps = teacher.model(z, 999, encoder_hidden_states=pixel.encode_prompts(prompts)).sample
    alpha_bar = make_scheduler().alphas_cumprod[999]
    x0 = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    assert torch.equal(pixel.one_step(prompts, seed=3), (x0.clamp(-1, 1) + 1) / 2)
    assert {"tiny", "tiny-smoke", "tiny-pixel", "tiny-pixel-smoke"} <= set(backbone_names())


def test_the_built_folder_is_a_stock_pipeline_that_samples_offline(latent, smoke_profile, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder(smoke_profile))
    images = pipe(["a red circle"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def _built_at(folder):
    stat = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat()
    return stat.st_ino, stat.st_mtime_ns


def test_the_folder_is_rebuilt_when_stale_and_only_then(tiny_sd, latent):
    profile, clip, *_ = tiny_sd
    folder = tiny_sd_folder(profile)
    sources = json.loads((folder / SOURCES_FILE).read_text())
    assert set(sources) == {"tiny_clip", "tiny_vae", "latent_teacher"}
    assert sources["latent_teacher"]["file"] == tiny_sd[3].path.name
    listed = artifacts.read_checksums(folder.parent)
    assert "tiny_sd-smoke/unet/diffusion_pytorch_model.safetensors" in listed
    before = _built_at(folder)
    assert load_or_build_tiny_sd_folder(profile, clip) == folder and _built_at(folder) == before  # current: kept
    stale = {**sources, "tiny_vae": {**sources["tiny_vae"], "sha256": "0" * 64}}  # as if the VAE had changed
    (folder / SOURCES_FILE).write_text(json.dumps(stale))
    load_or_build_tiny_sd_folder(profile, clip)
    assert _built_at(folder) != before and json.loads((folder / SOURCES_FILE).read_text()) == sources
    rebuilt = _built_at(folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # a damaged folder is stale too
    load_or_build_tiny_sd_folder(profile, clip)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file() and _built_at(folder) != rebuilt
    assert artifacts.folder_matches_checksums(folder)


def test_an_interrupted_build_leaves_the_old_folder(tiny_sd, latent, monkeypatch):
    profile, clip, *_ = tiny_sd
    folder = tiny_sd_folder(profile)
    (folder / SOURCES_FILE).write_text("{}")  # stale: the next call rebuilds

    def interrupted(staging, *args):
        (staging / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_sd_module, "save_tiny_sd_pipeline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_or_build_tiny_sd_folder(profile, clip)
    assert (folder / SOURCES_FILE).read_text() == "{}" and (folder / "unet").is_dir()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no half-built folder left
    monkeypatch.undo()
    load_or_build_tiny_sd_folder(profile, clip)
    assert artifacts.folder_matches_checksums(folder)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: latents of another size, denoisers and students of the other tiny world
# ---------------------------------------------------------------------------------------------------------------


def test_latents_of_another_size_are_refused_everywhere(latent):
    prompts = ["a red circle", "a green square"]
    wrong = torch.zeros(2, 3, 32, 32)  # the pixel world's shape
    message = r"latents must have shape \(.*4, 16, 16\) .*got \(2, 3, 32, 32\)"
    cond = latent.encode_prompts(prompts)
    calls = {
        "denoise": lambda: latent.denoise(wrong, 999, cond),
        "decode": lambda: latent.decode(wrong),
        "one_step": lambda: latent.one_step(prompts, latents=wrong),
        "sample": lambda: latent.sample(prompts, 2, 2.0, latents=wrong, progress=False),
        "one_step_generate": lambda: one_step_generate(latent.denoiser, latent, prompts, latents=wrong),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
    z = latent.noise(2, seed=1)
    assert torch.equal(latent.one_step(prompts, latents=z), latent.one_step(prompts, seed=1))
    torch.testing.assert_close(latent.sample(prompts, 2, 2.0, latents=z, progress=False),
                               latent.sample(prompts, 2, 2.0, seed=1, progress=False))
    with pytest.raises(ValueError, match=r"latents must have shape \(3, 4, 16, 16\)"):
        latent.one_step(prompts + ["a blue square"], latents=z)


def test_a_pixel_model_given_to_the_latent_world_says_so(latent, pixel, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in pixel.denoiser.state_dict().items()}
    save_file(state, str(tmp_path / "pixel_unet.safetensors"))
    message = r"pixel-space \(3-channel\) model but the backbone is latent \(4-channel\).*make reproduce.*ONLY=03"
    with pytest.raises(PipelineLoadError, match=rf"pixel_unet.safetensors is a {message}"):
        load_denoiser(tmp_path / "pixel_unet.safetensors", like=latent.denoiser)
    exported = export_student(pixel.denoiser, pixel, tmp_path / "pixel_student")  # a pixel world export
    pixel_student = load_denoiser(exported)
    with pytest.raises(PipelineLoadError, match=rf"pixel_student is a {message}"):
        check_denoiser_matches(pixel_student, latent)
    with pytest.raises(PipelineLoadError, match=message):
        one_step_generate(pixel_student, latent, ["a red circle"])
    check_denoiser_matches(latent.denoiser, latent)
    check_denoiser_matches(pixel_student, pixel)


def test_a_pixel_student_file_loaded_into_a_latent_student_names_the_file_and_the_rerun(latent, pixel, tmp_path):
    pixel_student, latent_student = copy.deepcopy(pixel.denoiser), copy.deepcopy(latent.denoiser)
    inject(pixel_student, "lorad", rank=2)
    inject(latent_student, "lorad", rank=2)
    path = tmp_path / "student-0123456789ab.safetensors"
    for trainable_only, example in ((True, "missing"), (False, r"conv_in.weight \(32, 3, 3, 3\) for \(32, 4, 3, 3\)")):
        weights = checkpoint_tensors(pixel_student, trainable_only=trainable_only)
        with pytest.raises(artifacts.ArtifactError, match=rf"student-0123456789ab.safetensors: .*{example}.*ONLY=03"):
            load_weights_strict(latent_student, weights, path, trainable_only=trainable_only)


def test_fresh_rebuilds_the_folder_with_the_retrained_artifacts(tiny_sd, latent, monkeypatch):
    profile, *_ = tiny_sd
    folder = tiny_sd_folder(profile)
    before = _built_at(folder)
    monkeypatch.setenv("WADI_FRESH", "1")
    monkeypatch.setattr(artifacts, "_WRITTEN_THIS_PROCESS", set())  # a new run: nothing written by it yet
    clip = load_or_train_tiny_clip(profile)
    assert clip.trained
    load_or_build_tiny_sd_folder(profile, clip)
    assert _built_at(folder) != before and artifacts.folder_matches_checksums(folder)
    again = _built_at(folder)
    load_or_build_tiny_sd_folder(profile, load_or_train_tiny_clip(profile))  # the same run: built once
    assert _built_at(folder) == again


def test_the_bundled_tiny_sd_draws_its_prompts_in_stock_diffusers(monkeypatch):
    """``data/tiny_sd`` as it ships, loaded by stock diffusers from its folder: the attribute reader reads the prompts'
    objects back from its 25-step samples, as it does from the teacher's in notebook 00."""
    monkeypatch.delenv("WADI_DATA_DIR", raising=False)  # the repository's data/, not the smoke fixture's
    monkeypatch.delenv("WADI_FRESH", raising=False)
    monkeypatch.setenv("WADI_NO_TRAIN", "1")  # a missing or stale bundled reader fails instead of retraining
    profile = get_profile("tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder(profile))
    prompts = make_split("coco14-like", profile.world).captions[:32]
    images = pipe(prompts, num_inference_steps=profile.sampling.num_inference_steps,
                  guidance_scale=profile.sampling.guidance_scale, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (32, 3, profile.world.resolution, profile.world.resolution)
    accuracy = attribute_accuracy(load_or_train_feature_net(profile).model, images, prompts)
    assert accuracy["objects"] >= 0.7
