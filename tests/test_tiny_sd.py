"""The latent tiny world at smoke size: VAE latents, a latent teacher in SD1.5's pattern, and the three saved as a
stock StableDiffusionPipeline folder that the one Backbone loads."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from wadi_core.backbones import load_backbone, load_or_train_tiny_clip
from wadi_core.backbones.tiny_sd import encode_latents, load_or_train_latent_teacher, save_tiny_sd_pipeline
from wadi_core.backbones.tiny_vae import load_or_train_tiny_vae


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
