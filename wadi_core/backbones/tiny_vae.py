"""The tiny world's VAE: an ``AutoencoderKL`` in SD's mould trained on ShapesWorld (the latent tiny world).

SD is a latent diffusion model: its one-step x0 is a latent that the VAE decodes, so ε errors amplified by
1/α_T do not land directly in pixels. The tiny VAE has SD's 4 latent channels and 2 levels instead of 4
(downsampling factor 2: 32×32 images, 4×16×16 latents; at f = 4 the smallest objects do not survive). Its loss
is MSE + L1 + a small KL term (SD's adds LPIPS and a patch GAN, which a procedural world of flat shapes does not
need), and ``scaling_factor`` is set from the latents' standard deviation, as SD's 0.18215 was.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from ..artifacts import TrainedModel, load_or_train
from ..optim import cosine_lr, set_lr
from ..profiles import Profile, VAETrainConfig
from ..world import ShapesDataset, make_split


def vae_config(config: VAETrainConfig, resolution: int) -> dict:
    """``AutoencoderKL`` kwargs of the tiny VAE (recorded in its checkpoint)."""
    levels = len(config.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.block_out_channels[0]),
        sample_size=resolution,
    )


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, config: VAETrainConfig,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + l1_weight·L1 + kl_weight·KL of a posterior sample's reconstruction; images in [−1, 1]."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(latents).sample
    mse, l1 = F.mse_loss(reconstruction, images), F.l1_loss(reconstruction, images)
    kl = posterior.kl().mean() / images[0].numel()  # per pixel value, like the other terms
    loss = mse + config.l1_weight * l1 + config.kl_weight * kl
    return loss, {"mse": mse.item(), "l1": l1.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the posterior means of ``images`` (in [−1, 1]): unit-variance latents, as SD set 0.18215."""
    means = torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean
                       for i in range(0, len(images), batch_size)])
    return float(1.0 / means.std())


def train_tiny_vae(train: ShapesDataset, config: VAETrainConfig) -> tuple[AutoencoderKL, dict]:
    """AdamW with a cosine lr on random training images; then ``scaling_factor`` from the latents' std."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**vae_config(config, train.images.shape[-1]))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    pixels = train.images_float()
    log: dict[str, list[float]] = {"step": [], "loss": [], "mse": [], "kl": [], "seconds": []}
    start = time.perf_counter()
    vae.train()
    for step in tqdm(range(config.steps), desc="tiny VAE", mininterval=5.0):
        batch = torch.randint(len(train), (config.batch_size,), generator=generator)
        loss, parts = vae_loss(vae, pixels[batch], config, generator)
        set_lr(optimizer, cosine_lr(step, config.steps, config.lr, config.lr_min, warmup_steps=config.steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        values = {"step": step, "loss": loss.item(), "mse": parts["mse"], "kl": parts["kl"],
                  "seconds": time.perf_counter() - start}
        for key, value in values.items():
            log[key].append(float(value))
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels[: config.scaling_samples]))
    return vae.requires_grad_(False), log


def vae_artifact_config(profile: Profile) -> dict:
    """What determines the tiny VAE of ``profile`` (its artifact key; a latent teacher's key includes it)."""
    return {"world": profile.world, "vae": profile.vae}


def load_or_train_tiny_vae(profile: Profile) -> TrainedModel:
    """The tiny VAE of ``profile``: loaded from ``data/`` when cached, else trained on the training split."""
    key = vae_artifact_config(profile)

    def build(metadata: dict[str, str]) -> AutoencoderKL:
        return AutoencoderKL.from_config(json.loads(metadata["model_config"])).requires_grad_(False)

    def train() -> tuple[AutoencoderKL, dict, dict[str, str]]:
        vae, log = train_tiny_vae(make_split("train", profile.world), profile.vae)
        # Without the "_…" bookkeeping keys: "_use_default_values" would make from_config drop scaling_factor.
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        return vae, log, {"model_config": json.dumps(config)}

    return load_or_train("tiny_vae", key, build, train, config=profile.vae, label="tiny VAE")


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decoded posterior means of uint8 or [0, 1] images, in [0, 1] (what the VAE keeps of them)."""
    pixels = images.float() / 255 if images.dtype == torch.uint8 else images
    out = []
    for i in range(0, len(pixels), batch_size):
        latents = vae.encode(pixels[i : i + batch_size] * 2 - 1).latent_dist.mean
        out.append((vae.decode(latents).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)
