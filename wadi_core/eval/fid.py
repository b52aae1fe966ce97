"""FID through clean-fid (PEERS_AND_PROTOCOLS.md §3), one code path for every profile.

clean-fid reads image folders. In the tiny world its Inception network is swapped for the ShapesWorld feature
network via ``custom_feat_extractor``, and its resize to 299 px for a no-op (``custom_fn_resize``), so the
features are those of the native 32×32 images. The ``paper`` profile calls the same function without an
extractor: clean-fid's own Inception in ``clean`` mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import shutil

import numpy as np
import torch
from cleanfid import fid as cleanfid
from PIL import Image
from tqdm import tqdm

from ..artifacts import cache_dir, config_hash
from ..world import ShapesDataset
from .features import ShapesFeatureNet


def save_images(images: torch.Tensor, folder: Path, start_index: int = 0, progress: bool = False) -> list[Path]:
    """Write images in [0, 1] (B, 3, H, W) as ``%06d.png``; files that already exist are kept (resumable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for offset, array in enumerate(tqdm(pixels, desc=f"PNG → {folder.name}", disable=not progress)):
        path = folder / f"{start_index + offset:06d}.png"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(array).save(tmp, format="PNG")
            tmp.replace(path)
        paths.append(path)
    return paths


def image_folder(images: torch.Tensor, name: str) -> Path:
    """A fresh cache folder ``<cache>/images/<name>`` holding exactly ``images`` (in [0, 1]) as PNGs."""
    folder = cache_dir() / "images" / name
    shutil.rmtree(folder, ignore_errors=True)
    save_images(images, folder)
    return folder


def reference_folder(dataset: ShapesDataset, world_config) -> Path:
    """The real images of a ShapesWorld split as PNGs, cached under a name keyed by the world config."""
    folder = cache_dir() / "images" / f"{dataset.name}-{len(dataset)}-{config_hash(world_config)}"
    save_images(dataset.images.float() / 255, folder)  # resumable: existing files are kept
    return folder


def feature_extractor(net: ShapesFeatureNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid extractor: (B, 3, H, W) floats in [0, 255] → features (B, D) of the ShapesWorld network."""

    @torch.no_grad()
    def extract(batch: torch.Tensor) -> torch.Tensor:
        return net.features(batch.float() / 127.5 - 1.0)

    return extract


def _keep_native_resolution(image: np.ndarray) -> np.ndarray:
    """clean-fid ``custom_fn_resize``: no resize; float32 in [0, 255] (clean-fid's ToTensor keeps the scale)."""
    return image.astype(np.float32)


def fid(generated_dir: Path, reference_dir: Path, features: ShapesFeatureNet | None = None, batch_size: int = 256) -> float:
    """FID between two image folders with clean-fid (``mode="clean"``).

    Args:
        generated_dir: folder of generated PNGs.
        reference_dir: folder of real reference PNGs.
        features: the ShapesWorld feature network (tiny world); None uses clean-fid's Inception (paper world).
    """
    for folder in (generated_dir, reference_dir):
        if not Path(folder).is_dir() or not any(Path(folder).iterdir()):
            raise FileNotFoundError(f"FID needs a folder of images, got {folder!r}")
    device = torch.device("cuda" if torch.cuda.is_available() and features is None else "cpu")
    kwargs = {}
    if features is not None:
        kwargs = dict(custom_feat_extractor=feature_extractor(features), custom_fn_resize=_keep_native_resolution)
    return float(
        cleanfid.compute_fid(
            str(generated_dir), str(reference_dir), mode="clean", batch_size=batch_size,
            device=device, num_workers=0, verbose=False, **kwargs,
        )
    )
