"""Sample generation for evaluation: one PNG per prompt, in batches, resumable (a 30k COCO run survives
interruption: rerunning the same call writes only the missing images)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .fid import _to_uint8, _write_png


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
