"""What determines a backbone's samples: the key under which the teacher's DDIM samples are cached, whether as
evaluation images (:func:`wadi_core.eval.cached_samples`) or as the (noise, x0) pairs a one-step student regresses
onto (:func:`wadi_core.distill.teacher_pairs`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from diffusers import DDIMScheduler

from ..artifacts import module_digest, prompts_digest
from .backbone import Backbone
from .tiny import SD15_SCHEDULER_CONFIG

SAMPLER = "ddim-cfg"  # wadi_core.backbones.sample_ddim: DDIM (η = 0) with classifier-free guidance


def samples_key(backbone: Backbone, prompts: Sequence[str], num_inference_steps: int, guidance_scale: float,
                seed: int, batch_size: int = 128) -> dict:
    """Everything that determines ``backbone.sample(prompts, ...)``: the teacher's and text encoder's weights,
    the prompts and their token ids, the sampler, its schedule and DDIM timesteps, guidance, seed, image size and
    batch size (batching can change the last bits of float32 results)."""
    prompts = list(prompts)
    tokens = backbone.tokenizer(prompts + [""], padding="max_length", max_length=backbone.max_length,
                                truncation=True, return_tensors="pt").input_ids  # with the null prompt's (CFG)
    ddim = DDIMScheduler.from_config(backbone.scheduler.config)  # as sample_ddim builds it
    ddim.set_timesteps(num_inference_steps)
    config = backbone.denoiser.config
    key = {
        "sampler": SAMPLER,
        "scheduler": {name: backbone.scheduler.config.get(name) for name in SD15_SCHEDULER_CONFIG},
        "timesteps": ddim.timesteps.tolist(),
        "teacher": module_digest(backbone.denoiser),
        "text_encoder": module_digest(backbone.text_encoder),
        "prompts": prompts_digest(prompts),
        "tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16],
        "image_size": [config.in_channels, config.sample_size, config.sample_size],
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "batch_size": int(batch_size),
    }
    if backbone.vae is not None:  # a latent backbone's images also depend on its decoder
        key["vae"] = module_digest(backbone.vae)
    return key
