"""The one Backbone on the paper-smoke pipelines (random weights, the paper's structure): conditioning, ε, decode,
latent VSD steps, export to a stock diffusers pipeline that reproduces the one-step student, and bad input."""

import json
import shutil

import diffusers
import pytest
import torch

from wadi_core.adapters import adapter_modules, inject
from wadi_core.backbones import OFFICIAL_ONE_STEP_ALPHA_BAR, PipelineLoadError, load_backbone
from wadi_core.backbones.smoke import smoke_pipeline
from wadi_core.distill import VSDConfig, distill, export_student, one_step_generate, one_step_scheduler_config
from wadi_core.distill.vsd import latest_checkpoint

KINDS = ("sd15", "sd21-base", "pixart-alpha-256")
PROMPTS = ["a red circle", "a blue square left of a green triangle", "a small yellow triangle"]


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """Smoke pipelines built into a temporary cache; the model hub is never asked."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module", params=KINDS)
def backbone(request):
    return load_backbone(f"smoke-{request.param}", device="cpu")


def _perturbed_student(backbone):
    """The teacher with a LoRaD student adapter at a non-identity rotation (so export ≠ teacher)."""
    student = load_backbone(backbone.name, device="cpu").denoiser
    inject(student, "lorad", rank=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in adapter_modules(student).values():
            module.theta_a.copy_(0.05 * torch.randn(module.theta_a.shape, generator=generator))
    return student.eval()


def test_components_and_recipe_follow_the_architecture(backbone):
    transformer = backbone.name.endswith("pixart-alpha-256")
    assert backbone.pipeline_class == ("PixArtAlphaPipeline" if transformer else "StableDiffusionPipeline")
    assert isinstance(backbone.scheduler, diffusers.DDPMScheduler)
    assert backbone.is_transformer == transformer
    assert backbone.latent_shape == (4, 16, 16) and backbone.resolution == 32
    assert backbone.student_rank == (128 if transformer else 256) and backbone.fake_rank == 32
    assert backbone.one_step_alpha_bar == (OFFICIAL_ONE_STEP_ALPHA_BAR if transformer else None)
    assert backbone.max_length == (120 if transformer else 77)
    assert all(not p.requires_grad for p in backbone.denoiser.parameters())
    student, fake = backbone.adapted_layers("student"), backbone.adapted_layers("fake")
    assert set(fake) < set(student)
    assert not any(skip in name for name in fake for skip in ("proj_in", "proj_out", "time_emb_proj"))


def test_conditioning_denoise_and_decode(backbone):
    cond, null = backbone.encode_prompts(PROMPTS), backbone.null_embedding()
    encoder = backbone.text_encoder.config
    width = encoder.d_model if backbone.is_transformer else encoder.hidden_size
    if backbone.is_transformer:  # T5 states with the attention mask as the last feature
        assert cond.shape == (3, 120, width + 1)
        mask = cond[..., -1]
        lengths = backbone.tokenizer(PROMPTS, padding="max_length", max_length=120, return_tensors="pt")
        assert torch.equal(mask, lengths.attention_mask.float()) and 0 < mask.sum() < mask.numel()
    else:
        assert cond.shape == (3, 77, width)
    assert null.shape == (1, *cond.shape[1:])
    z = backbone.noise(3, seed=1)
    eps = backbone.denoise(z, torch.tensor([999, 500, 10]), cond)
    assert eps.shape == z.shape  # PixArt's learned-sigma half is dropped
    images = backbone.decode(z)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    samples = backbone.sample(PROMPTS, 2, 2.0, seed=4, batch_size=2, progress=False)
    assert samples.shape == (3, 3, 32, 32)
    torch.testing.assert_close(samples, backbone.sample(PROMPTS, 2, 2.0, seed=4, batch_size=3, progress=False),
                               atol=1e-5, rtol=0)


def test_one_step_scheduler_reproduces_the_one_step_alpha_bar(backbone):
    lcm = diffusers.LCMScheduler.from_config(one_step_scheduler_config(backbone))
    lcm.set_timesteps(1)
    assert lcm.timesteps.tolist() == [999]
    expected = backbone.one_step_alpha_bar or float(backbone.scheduler.alphas_cumprod[999])
    assert float(lcm.alphas_cumprod[999]) == pytest.approx(expected, rel=1e-5)


def test_exported_student_runs_in_stock_diffusers_and_equals_one_step_generate(backbone, tmp_path):
    student = _perturbed_student(backbone)
    folder = export_student(student, backbone, tmp_path / "export")
    assert adapter_modules(student)  # the student itself keeps its adapters
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == backbone.pipeline_class and isinstance(pipe.scheduler, diffusers.LCMScheduler)
    z = backbone.noise(len(PROMPTS), seed=3)
    extra = {"use_resolution_binning": False, "clean_caption": False} if backbone.is_transformer else {}
    stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=z.clone(), output_type="pt",
                 **extra).images
    ours = one_step_generate(student, backbone, PROMPTS, latents=z)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=0)
    teacher = one_step_generate(backbone.denoiser, backbone, PROMPTS, latents=z)
    assert (teacher - ours).abs().max() > 1e-3  # the export carries the student, not the teacher
    again = export_student(student, backbone, folder)  # a previous export is replaced
    assert again == folder and (folder / "model_index.json").is_file()


def test_latent_vsd_steps_resume_and_use_the_backbones_one_step_alpha_bar(backbone, tmp_path):
    config = VSDConfig(student_rank=2, fake_rank=1, batch_size=2, steps=2, checkpoint_every=1, seed=0)
    first = distill(backbone, PROMPTS, config, tmp_path / "run", max_steps=1, progress=False)
    assert first.steps_done == 1
    result = distill(backbone, PROMPTS, config, tmp_path / "run", progress=False)
    assert result.resumed_from == 1 and result.steps_done == 2 and len(result.log) == 2
    assert result.log[["generator_loss", "fake_loss"]].notna().all().all()
    from safetensors import safe_open

    with safe_open(str(latest_checkpoint(tmp_path / "run")), framework="pt") as handle:
        saved = json.loads(handle.metadata()["config"])
    assert saved["one_step_alpha_bar"] == backbone.one_step_alpha_bar


def test_prompts_encoded_on_the_fly_train_like_cached_ones(backbone, tmp_path):
    config = VSDConfig(student_rank=2, fake_rank=1, batch_size=2, steps=2, checkpoint_every=2, seed=0)
    cached = distill(backbone, PROMPTS, config, tmp_path / "cached", progress=False, cache_embeddings=True)
    lazy = distill(backbone, PROMPTS, config, tmp_path / "lazy", progress=False, cache_embeddings=False)
    columns = ["generator_loss", "fake_loss", "student_grad_norm"]
    # Encoding 3 prompts at once or 2 per step changes the text states' last bits; the fake score's lr of 1e-2
    # carries that into the second step's losses at the 1e-3 level.
    assert torch.allclose(torch.tensor(cached.log[columns].values), torch.tensor(lazy.log[columns].values),
                          rtol=3e-3, atol=1e-7)


def test_pixart_one_step_alpha_bar_is_the_official_value_and_x0_is_never_clipped(backbone):
    assert backbone.scheduler.config.clip_sample is False
    if not backbone.is_transformer:
        pytest.skip("PixArt only")
    assert float(backbone.scheduler.alphas_cumprod[999]) < 1e-4  # PixArt's linear schedule: about 4e-5
    assert backbone.one_step_alpha_bar == 0.0047


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sd15_copy(tmp_path):
    folder = tmp_path / "sd15"
    shutil.copytree(smoke_pipeline("sd15"), folder)
    return folder


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone .sd3.*tiny, tiny-smoke, tiny-pixel, tiny-pixel-smoke, sd"):
        load_backbone("sd3")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(PipelineLoadError, match="no model_index.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("removed, message", [
    ("vae", "'vae' component's folder .*/vae is missing"),
    ("vae/diffusion_pytorch_model.safetensors", r"/vae holds no weights file \(\*.safetensors or \*.bin\)"),
    ("unet/diffusion_pytorch_model.safetensors", r"/unet holds no weights file"),
    ("text_encoder/config.json", r"/text_encoder/config.json is missing"),
    ("tokenizer/tokenizer.json", r"/tokenizer lacks its files \(tokenizer.json or vocab.json \+ merges.txt"),
    ("scheduler/scheduler_config.json", r"/scheduler lacks its files \(scheduler_config.json\)"),
])
def test_a_missing_component_or_file_is_named_with_what_to_do(sd15_copy, removed, message):
    path = sd15_copy / removed
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(PipelineLoadError, match=f"{message}.*copy it again, or save it again"):
        load_backbone(sd15_copy)


def test_unsupported_pipeline_class(sd15_copy):
    index = json.loads((sd15_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (sd15_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineLoadError, match="StableDiffusionXLPipeline.*not supported"):
        load_backbone(sd15_copy)


def test_mismatched_text_encoder_and_unet(sd15_copy):
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd15_copy / "unet")
    config = dict(unet.config)
    config["cross_attention_dim"] = 2 * config["cross_attention_dim"]
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(sd15_copy / "unet")
    with pytest.raises(PipelineLoadError, match="text_encoder width .* cross_attention_dim"):
        load_backbone(sd15_copy)


def test_v_prediction_scheduler_is_refused(sd15_copy):
    path = sd15_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(config))
    with pytest.raises(PipelineLoadError, match="prediction_type 'v_prediction'"):
        load_backbone(sd15_copy)


def test_export_refuses_a_foreign_folder_and_bad_latents(tmp_path):
    backbone = load_backbone("smoke-sd15", device="cpu")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an exported student"):
        export_student(backbone.denoiser, backbone, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 16, 16\).*got \(2, 4, 8, 8\)"):
        one_step_generate(backbone.denoiser, backbone, PROMPTS[:2], latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latents must have shape \('B', 4, 16, 16\).*got \(2, 4, 8, 8\)"):
        backbone.denoise(torch.zeros(2, 4, 8, 8), 999, backbone.encode_prompts(PROMPTS[:2]))


# ---------------------------------------------------------------------------------------------------------------
# load_denoiser: Fig. 1's model pairs from names, folders and released state dicts
# ---------------------------------------------------------------------------------------------------------------


def test_load_denoiser_from_a_name_a_pipeline_folder_a_model_folder_and_a_state_dict(tmp_path):
    from safetensors.torch import save_file

    from wadi_core.backbones.denoisers import load_denoiser

    teacher = load_denoiser("smoke-sd15")
    assert type(teacher).__name__ == "UNet2DConditionModel" and not any(p.requires_grad for p in teacher.parameters())
    student = _perturbed_student(load_backbone("smoke-sd15", device="cpu"))
    export_student(student, load_backbone("smoke-sd15", device="cpu"), tmp_path / "pipeline")
    from wadi_core.adapters import merged_copy

    merged = merged_copy(student)
    merged.save_pretrained(tmp_path / "model")
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(tmp_path / "rotated_unet.safetensors"))
    for source in (tmp_path / "pipeline", tmp_path / "model", tmp_path / "rotated_unet.safetensors"):
        loaded = load_denoiser(source, like=teacher)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in merged.state_dict().items())
    with pytest.raises(ValueError, match="bare state dict"):
        load_denoiser(tmp_path / "rotated_unet.safetensors")
    wrong = {k: v for k, v in merged.state_dict().items() if "mid_block" not in k}
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(PipelineLoadError, match="does not load strictly.*missing \\['mid_block"):
        load_denoiser(tmp_path / "partial.safetensors", like=teacher)
    with pytest.raises(PipelineLoadError, match="neither a model folder"):
        load_denoiser(tmp_path)


def test_distill_refuses_a_one_step_alpha_bar_the_backbone_would_not_sample_with(tmp_path):
    backbone = load_backbone("smoke-sd15", device="cpu")
    config = VSDConfig(student_rank=2, fake_rank=1, batch_size=2, steps=1, one_step_alpha_bar=0.0047)
    with pytest.raises(ValueError, match="set backbone.one_step_alpha_bar instead"):
        distill(backbone, PROMPTS, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_official_recipes():
    sd15, pixart = VSDConfig.official("sd15"), VSDConfig.official("pixart-alpha-256")
    assert (sd15.student_rank, sd15.fake_rank, sd15.student_lr, sd15.fake_lr) == (256, 32, 1e-4, 1e-2)
    assert (sd15.mixed_precision, sd15.optimizer, sd15.gradient_checkpointing) == ("fp16", "adamw_8bit", True)
    assert (pixart.student_rank, pixart.mixed_precision, pixart.one_step_alpha_bar) == (128, "bf16", 0.0047)
    with pytest.raises(ValueError, match="no official recipe"):
        VSDConfig.official("sd3")


def test_load_denoiser_of_an_uncached_hub_id_offline_says_so(monkeypatch, tmp_path):
    import huggingface_hub

    from wadi_core.backbones.denoisers import load_denoiser

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(PipelineLoadError, match="tianweiy/DMD2 is not in the local model-hub cache"):
        load_denoiser("tianweiy/DMD2")
