"""Sample generation for evaluation: one PNG per prompt, in batches, resumable (a 30k COCO run survives
interruption: rerunning the same call writes only the missing images); and the teacher's multi-step samples,
cached in the data directory (:func:`cached_samples`), since re-deriving them costs more than everything that
reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..artifacts import (
    artifact_path,
    cached,
    load_checkpoint,
    save_checkpoint,
    training_allowed,
)
from ..backbones.backbone import Backbone
from ..backbones.sample_keys import samples_key
from .fid import _to_uint8, _write_png

SAMPLES_KIND = "samples"


@dataclass
class CachedSamples:
    """The teacher's images for a list of prompts, and whether this call sampled them or loaded them."""

    images: torch.Tensor  # what ``backbone.sample`` returns: float32 in [0, 1], (B, 3, H, W)
    sampled: bool  # True: sampled by this call (and saved); False: loaded from the data directory
    path: Path
    seconds: float  # wall time of the sampling that produced the images (this call's, or the cached run's)

    def status(self) -> str:
        verb = "sampled now and saved as" if self.sampled else "loaded from the cache"
        return f"{len(self.images)} teacher samples: {verb} {self.path.name} (sampling took {self.seconds:.1f} s)"


def one_step_key(backbone: Backbone, prompts: Sequence[str], seed: int) -> dict:
    """Everything that determines ``backbone.one_step(prompts, seed=seed)`` (the teacher's own one-step images):
    :func:`samples_key`'s weights, prompts, tokens, image size and seed, with the one-step ᾱ in place of DDIM's
    steps and guidance."""
    key = samples_key(backbone, prompts, 1, 1.0, seed)
    for name in ("timesteps", "num_inference_steps", "guidance_scale", "batch_size"):
        del key[name]
    return {**key, "sampler": "one-step", "one_step_alpha_bar": backbone.one_step_alpha_bar}


def cached_samples(backbone: Backbone, prompts: Sequence[str], num_inference_steps: int, guidance_scale: float,
                   seed: int, batch_size: int = 128, progress: bool = False) -> CachedSamples:
    """``backbone.sample(prompts, num_inference_steps, guidance_scale, seed=seed)``, cached as
    ``<data dir>/samples-<hash>.safetensors`` (float32, so what is loaded equals what is sampled bit for bit)
    keyed by :func:`samples_key`.

    Like the trained artifacts: ``WADI_FRESH=1`` samples again (once per run), a temporary ``WADI_DATA_DIR``
    (the smoke run) starts empty, and ``WADI_NO_TRAIN=1`` turns a missing cache into an error.

    Raises:
        ArtifactError: the samples are not cached and ``WADI_NO_TRAIN=1`` forbids sampling them, or the cached
            file is damaged (SHA256SUMS), corrupt, or from another key.
    """
    key = samples_key(backbone, prompts, num_inference_steps, guidance_scale, seed, batch_size)
    path = cached(SAMPLES_KIND, key)
    if path is not None:
        tensors, metadata = load_checkpoint(path, key)
        return CachedSamples(tensors["images"], sampled=False, path=path, seconds=float(metadata["seconds"]))
    path = artifact_path(SAMPLES_KIND, key)
    training_allowed("teacher samples", path)
    start = time.perf_counter()
    images = backbone.sample(list(prompts), num_inference_steps, guidance_scale, seed=seed, batch_size=batch_size,
                             progress=progress)
    seconds = time.perf_counter() - start
    save_checkpoint(path, {"images": images}, key, seconds=repr(seconds), threads=str(torch.get_num_threads()))
    return CachedSamples(images, sampled=True, path=path, seconds=seconds)


def per_image_generator(index: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator for image ``index`` of a run seeded with ``seed``; independent of batching."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + index)


def per_image_noise(indices: Sequence[int], shape: Sequence[int], seed: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise (B, *shape), row b drawn from :func:`per_image_generator` ``(indices[b], seed)``.

    Row b depends only on (seed, index), never on the batch it falls in: a resumed run reproduces the images an
    uninterrupted run would have written.
    """
    return torch.stack([
        torch.randn(tuple(shape), generator=per_image_generator(int(i), seed, "cpu"), dtype=dtype) for i in indices
    ]).to(device)


def generate_to_folder(generate_fn: Callable[[list[str], list[int]], torch.Tensor], prompts: Sequence[str],
                       folder: Path, batch_size: int = 16, seed: int | None = 0, progress: bool = True) -> list[Path]:
    """Write ``generate_fn``'s image for prompt i as ``folder/%06d.png`` (i = 0, 1, ...), skipping existing files.

    Args:
        generate_fn: ``generate_fn(prompts_batch, indices) -> images`` in [0, 1], (B, 3, H, W). ``indices`` are
            the global prompt indices of the batch, so it can seed each image on its own (e.g. with
            :func:`per_image_noise`): then the images do not depend on the batching, and a resumed run (whose
            batches hold only the missing indices) writes the same images as an uninterrupted one.
        prompts: one prompt per image.
        folder: output folder (created).
        batch_size: prompts per ``generate_fn`` call.
        seed: if not None, ``torch.manual_seed(seed * 1_000_003 + indices[0])`` before each call: a fallback that
            makes a ``generate_fn`` drawing from the global RNG repeatable for a fixed batching only.
        progress: show a tqdm bar over the images.

    Returns:
        The paths of all ``len(prompts)`` images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.png" for i in range(len(prompts))]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    with tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=f"generate → {folder.name}",
              disable=not progress) as bar:
        for start in range(0, len(missing), batch_size):
            indices = missing[start : start + batch_size]
            if seed is not None:
                torch.manual_seed(seed * 1_000_003 + indices[0])
            images = generate_fn([prompts[i] for i in indices], indices)
            if images.ndim != 4 or images.shape[0] != len(indices) or images.shape[1] != 3:
                raise ValueError(
                    f"generate_fn must return (B, 3, H, W) images for B={len(indices)} prompts, "
                    f"got {tuple(images.shape)}"
                )
            for i, pixels in zip(indices, _to_uint8(images)):
                _write_png(pixels, paths[i])
            bar.update(len(indices))
    return paths
