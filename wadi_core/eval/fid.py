"""FID through clean-fid (Parmar et al., 2022; ``docs/paper_notes.md#fid``), one code path for every profile.

clean-fid reads image folders. In the tiny world its Inception network is swapped for the ShapesWorld feature
network via ``custom_feat_extractor``, and its resize to 299 px for a no-op (``custom_fn_resize``), so the
features are those of the native 32×32 images. The ``paper`` profile calls the same functions without an
extractor: clean-fid's own Inception in ``clean`` mode.

Every step is a flat function, as in clean-fid: :func:`folder_features` (clean-fid's
``get_folder_features``), :func:`reference_stats` (μ, Σ of a reference folder, cached) and :func:`fid`
(clean-fid's ``frechet_distance``). Reference statistics are cached as
``<cache>/fid_stats/<name>-<mode>-<extractor>-<hash>.npz``, where the hash covers the folder's manifest (file
names, sizes and SHA-256 of contents) and the extractor's identity (weights included), so stats never leak
across folders, protocols or feature networks. clean-fid's own ``make_custom_stats`` is not used: it writes
into its installed package folder and keys files by a name only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from cleanfid import fid as cleanfid
from cleanfid.features import build_feature_extractor
from cleanfid.utils import EXTENSIONS
from PIL import Image
from tqdm import tqdm

from ..artifacts import atomic_path, cache_dir, config_hash, file_sha256
from ..world import ShapesDataset
from .features import ShapesFeatureNet

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")  # clean-fid's protocols (cleanfid/resize.py)
_HOW_TO_BUILD = (
    "build it with wadi_core.eval.reference_folder(dataset, world_config) (tiny world) or, for COCO, "
    "wadi_core.eval.center_crop_resize_folder(<val2014 images>, <folder>, size=256) (paper profile)"
)


def _write_png(pixels: np.ndarray, path: Path) -> None:
    """Atomically write one (H, W, 3) uint8 image (a temporary file of this process renamed into place, so that
    two processes filling the same cached folder cannot take each other's file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (B, 3, H, W) → uint8 (B, H, W, 3), rounded like clean-fid expects."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_images(images: torch.Tensor, folder: Path, start_index: int = 0, progress: bool = False) -> list[Path]:
    """Write images in [0, 1] (B, 3, H, W) as ``%06d.png``; files that already exist are kept (resumable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, array in enumerate(tqdm(_to_uint8(images), desc=f"PNG → {folder.name}", disable=not progress)):
        path = folder / f"{start_index + offset:06d}.png"
        if not path.exists():
            _write_png(array, path)
        paths.append(path)
    return paths


@contextmanager
def temporary_image_folder(images: torch.Tensor, name: str) -> Iterator[Path]:
    """A private folder ``<cache>/images/<name>-<random>`` holding exactly ``images`` (in [0, 1]) as PNGs while the
    context lasts, removed on exit: scorers running side by side (two notebooks, two training jobs) never read
    one another's images."""
    root = cache_dir() / "images"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        save_images(images, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


# --- image folders -------------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """The image files clean-fid reads from ``folder`` (its extensions, recursive), in its sorted order."""
    found = (f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))
    return [Path(f) for f in sorted(found)]


def _checked_files(folder: Path, role: str) -> list[Path]:
    """Image files of an existing, non-empty folder; else FileNotFoundError (1 image: ValueError)."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = f"; {_HOW_TO_BUILD}" if role == "reference" else ""
        raise FileNotFoundError(f"FID needs a folder of images: {role} folder {str(folder)!r} does not exist{hint}")
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"FID needs a folder of images: {role} folder {str(folder)!r} holds no images")
    if len(files) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set (a covariance), but {role} folder {str(folder)!r} has {len(files)}"
        )
    return files


def folder_manifest_hash(folder: Path) -> str:
    """SHA-256 over the sorted relative names, sizes and content hashes of the images clean-fid would read.

    Memoised within the process on (name, size, mtime) so repeated FID calls re-hash nothing that is unchanged.
    """
    folder = Path(folder)
    files = image_files(folder)
    stats = tuple((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(folder.resolve()), stats)
    if key not in _MANIFEST_MEMO:
        digest = hashlib.sha256()
        for (name, size, _), path in zip(stats, files):
            digest.update(f"{name}\0{size}\0{file_sha256(path)}\n".encode())
        _MANIFEST_MEMO[key] = digest.hexdigest()
    return _MANIFEST_MEMO[key]


_MANIFEST_MEMO: dict[tuple, str] = {}


# --- features --------------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode {mode!r}; choose one of {MODES}")


def _device(features: ShapesFeatureNet | None) -> torch.device:
    if features is not None:
        return next(features.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extractor_identity(features: ShapesFeatureNet | None, mode: str = "clean") -> dict:
    """What decides the features of an image: the network (weights hashed), the resize and the clean-fid mode.

    Keys the reference-statistics cache: retraining the feature net or changing the mode makes a new file.
    """
    if features is None:
        net = {"name": "inception_v3", "clean_fid": importlib.metadata.version("clean-fid")}
    else:
        digest = hashlib.sha256()
        for name, tensor in features.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        net = {"name": type(features).__name__, "weights_sha256": digest.hexdigest(), "resize": "native"}
    return {"mode": mode, "net": net}


def folder_features(folder: Path, features: ShapesFeatureNet | None = None, batch_size: int = 256,
                    mode: str = "clean") -> np.ndarray:
    """Feature matrix (N, D) of a folder of images, through clean-fid's ``get_folder_features``.

    The same choices as :func:`fid`: the ShapesWorld network at native resolution when ``features`` is given,
    else clean-fid's Inception (``mode``; 2048-d pool features, resize to 299 in ``clean`` mode).
    """
    _check_mode(mode)
    folder = Path(folder)
    _checked_files(folder, "image")
    device = _device(features)
    if features is None:
        model, resize = build_feature_extractor(mode, device, use_dataparallel=False), None
    else:
        model, resize = feature_extractor(features), _keep_native_resolution
    return cleanfid.get_folder_features(
        str(folder), model, num_workers=0, batch_size=batch_size, device=device, mode=mode,
        custom_fn_resize=resize, description=f"features {folder.name}: ", verbose=False,
    )


def _warn_if_rank_deficient(count: int, dim: int, what: str) -> None:
    if count <= dim:
        warnings.warn(
            f"{what}: {count} images for {dim}-d features: the covariance is rank-deficient (needs more than "
            f"{dim} images), so FID is biased and unstable; use more images", stacklevel=3,
        )


# --- statistics and FID ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceStats:
    """μ (D,) and Σ (D, D) of a reference folder's features, as clean-fid computes them (np.mean, np.cov)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int  # number of reference images
    path: Path | None  # cache file (None when not cached)
    cached: bool  # True when read from an existing cache file


def stats_from_features(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) exactly as clean-fid's ``compare_folders`` computes them."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def reference_stats_path(reference_dir: Path, features: ShapesFeatureNet | None = None, mode: str = "clean",
                         name: str | None = None) -> Path:
    """``<cache>/fid_stats/<name>-<mode>-<extractor>-<hash>.npz``; the hash covers folder contents and extractor."""
    _check_mode(mode)
    identity = extractor_identity(features, mode)
    key = config_hash({"manifest": folder_manifest_hash(reference_dir), "extractor": identity})
    name = name or Path(reference_dir).resolve().name
    return cache_dir() / "fid_stats" / f"{name}-{mode}-{identity['net']['name']}-{key}.npz"


def reference_stats(reference_dir: Path, features: ShapesFeatureNet | None = None, name: str | None = None,
                    mode: str = "clean", batch_size: int = 256, cache: bool = True) -> ReferenceStats:
    """μ, Σ of a reference folder, read from (or written to) the FID-statistics cache.

    clean-fid's ``make_custom_stats`` + ``compute_fid(..., dataset_split="custom")``, but stored under our cache
    directory and keyed by contents + extractor, not by a name inside the installed package.

    Args:
        reference_dir: folder of real reference images (for COCO: already centre-cropped and resized to 256).
        features: the ShapesWorld feature network; None uses clean-fid's Inception.
        name: readable prefix of the cache file (default: the folder's name); does not key the cache.
        mode: clean-fid protocol, one of :data:`MODES`.
        cache: False computes the statistics without reading or writing the cache.
    """
    files = _checked_files(reference_dir, "reference")
    if not cache:
        feats = folder_features(reference_dir, features, batch_size, mode)
        _warn_if_rank_deficient(len(feats), feats.shape[1], f"reference folder {str(reference_dir)!r}")
        mu, sigma = stats_from_features(feats)
        return ReferenceStats(mu, sigma, len(files), None, cached=False)
    path = reference_stats_path(reference_dir, features, mode, name)
    if path.exists():
        with np.load(path) as stored:
            stats = ReferenceStats(stored["mu"], stored["sigma"], int(stored["count"]), path, cached=True)
        _warn_if_rank_deficient(stats.count, len(stats.mu), f"reference folder {str(reference_dir)!r}")
        return stats
    feats = folder_features(reference_dir, features, batch_size, mode)
    _warn_if_rank_deficient(len(feats), feats.shape[1], f"reference folder {str(reference_dir)!r}")
    mu, sigma = stats_from_features(feats)
    info = json.dumps({"folder": str(Path(reference_dir).resolve()), "extractor": extractor_identity(features, mode)})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the temporary name
            np.savez(f, mu=mu, sigma=sigma, count=np.int64(len(feats)), info=np.array(info))
    return ReferenceStats(mu, sigma, len(feats), path, cached=False)


def fid(generated_dir: Path, reference_dir: Path, features: ShapesFeatureNet | None = None, batch_size: int = 256,
        mode: str = "clean", cache: bool = True) -> float:
    """FID between two image folders with clean-fid (``mode="clean"``).

    Equal to ``cleanfid.fid.compute_fid(generated_dir, reference_dir, mode=mode, ...)`` with the same extractor
    and resize; the reference side comes from :func:`reference_stats` (cached unless ``cache=False``).

    Args:
        generated_dir: folder of generated PNGs.
        reference_dir: folder of real reference PNGs.
        features: the ShapesWorld feature network (tiny world); None uses clean-fid's Inception (paper world).
        batch_size: images per feature-extraction batch.
        mode: clean-fid protocol, one of :data:`MODES`.
        cache: read/write the reference statistics cache.

    Raises:
        FileNotFoundError: a folder is missing or holds no images.
        ValueError: a folder holds a single image, or ``mode`` is unknown.

    Warns when a set has no more images than feature dimensions (rank-deficient covariance).
    """
    _check_mode(mode)
    _checked_files(generated_dir, "generated")
    reference = reference_stats(reference_dir, features, mode=mode, batch_size=batch_size, cache=cache)
    feats = folder_features(generated_dir, features, batch_size, mode)
    _warn_if_rank_deficient(len(feats), feats.shape[1], f"generated folder {str(generated_dir)!r}")
    mu, sigma = stats_from_features(feats)
    return float(cleanfid.frechet_distance(mu, sigma, reference.mu, reference.sigma))
