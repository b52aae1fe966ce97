"""The latent tiny world's VAE: SD's AutoencoderKL with 4 latent channels at f = 2, scaling factor from the
latents' std, cached like every artifact."""

import pytest
import torch

from wadi_core.backbones.tiny_vae import latent_scaling_factor, load_or_train_tiny_vae, reconstruct, vae_config


@pytest.fixture(scope="module")
def smoke_vae(smoke_profile):
    return smoke_profile, load_or_train_tiny_vae(smoke_profile), load_or_train_tiny_vae(smoke_profile)


def test_latents_are_four_channels_at_half_the_side(smoke_vae):
    profile, vae, _ = smoke_vae
    side = profile.world.resolution
    assert vae_config(profile.vae, side)["latent_channels"] == 4
    latents = vae.model.encode(torch.zeros(2, 3, side, side)).latent_dist.mean
    assert latents.shape == (2, 4, side // 2, side // 2)
    images = reconstruct(vae.model, torch.full((2, 3, side, side), 128, dtype=torch.uint8))
    assert images.shape == (2, 3, side, side) and 0 <= images.min() and images.max() <= 1


def test_scaling_factor_gives_unit_variance_latents(smoke_vae):
    profile, vae, _ = smoke_vae
    from wadi_core.world import make_split

    pixels = make_split("train", profile.world).images_float()[: profile.vae.scaling_samples]
    factor = vae.model.config.scaling_factor
    assert factor == pytest.approx(latent_scaling_factor(vae.model, pixels), rel=1e-6) and factor != 0.18215
    scaled = vae.model.encode(pixels).latent_dist.mean * factor
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4)


def test_cached_vae_loads_bit_for_bit(smoke_vae):
    _, first, again = smoke_vae
    assert first.trained and not again.trained
    assert again.model.config.scaling_factor == first.model.config.scaling_factor
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(first.log.columns) == {"step", "loss", "mse", "kl", "seconds"} and len(first.log) == 5
