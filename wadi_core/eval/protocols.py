"""The SwiftBrush-v2 COCO protocols as one call (``docs/paper_notes.md#evaluation-protocols``): captions →
one image per caption → centre-crop + LANCZOS resize of real and generated images to 256 → clean-fid FID and
the open_clip ViT-g-14 CLIP score → eval manifest.

SwiftBrush-v2's public evaluation code (``tools/resize.py``, ``eval/fid.py``, ``eval/clip_score.py``) resizes
the whole COCO-2014 validation folder as the reference set, so :func:`coco_protocol` does the same for
``coco2014-30k``; ``coco2017-5k`` compares with its 5,000 captioned val2017 images. The networks can be
swapped for stand-ins (``features=``, ``clip_scorer=``), and :func:`write_coco_stand_in` writes a COCO-format
folder of ShapesWorld images, so the whole code path runs on a CPU without COCO or any downloaded weights.
"""

from __future__ import annotations

import json
import platform
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception
from PIL import Image

from ..artifacts import atomic_write_text, file_sha256
from ..backbones.backbone import hub_offline
from ..distill import one_step_generate
from .clip_score import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED, PaperClipScorer, clip_score_paper, paper_clip_scorer
from .coco import (
    COCO_EVAL_SIZE,
    _load_annotations,
    center_crop_resize_folder,
    coco2014_30k,
    coco2014_30k_captions,
    coco2017_5k,
    write_eval_manifest,
)
from .features import ShapesFeatureNet
from .fid import _write_png, extractor_identity, fid, image_files
from .samples import generate_to_folder, per_image_noise

PROTOCOLS = ("coco2014-30k", "coco2017-5k")
COCO14_PROMPTS = 30_000  # COCO-2014 30k: captions drawn from captions_val2014.json
# clean-fid's mode="clean" loads its TorchScript Inception from this folder (cleanfid/features.py
# ``feature_extractor``: "./" on Windows, else "/tmp"), downloading it there on first use.
CLEANFID_INCEPTION_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
CLIP_CHUNK = 256  # generated images held in memory at once while computing the CLIP score

GenerateFn = Callable[[list[str], list[int]], torch.Tensor]
ClipScorer = Callable[[torch.Tensor, list[str]], float]


def one_step_generator(student: torch.nn.Module, backbone, seed: int = 0) -> GenerateFn:
    """``generate(prompts, indices)`` for :func:`coco_protocol`: the student's one-step images
    (:func:`~wadi_core.distill.one_step_generate`, as the official ``infer_sd_model.py``) on per-image latents
    (:func:`~wadi_core.eval.per_image_noise` with ``seed``), so image i does not depend on the batching."""

    def generate(prompts: list[str], indices: list[int]) -> torch.Tensor:
        latents = per_image_noise(indices, backbone.latent_shape, seed)
        return one_step_generate(student, backbone, prompts, latents=latents)

    return generate


def require_cleanfid_inception() -> Path:
    """The path of clean-fid's Inception weights, downloaded now if missing; RuntimeError when they cannot be had.

    clean-fid would otherwise download them at the first FID call, after every image has been generated. With
    ``HF_HUB_OFFLINE=1`` (the project's offline switch) nothing is downloaded.
    """
    path = CLEANFID_INCEPTION_DIR / CLEANFID_INCEPTION_FILE
    how = (f"run once with network (clean-fid downloads it to {path}), or pass features=<a stand-in "
           "ShapesFeatureNet> to test the protocol's code path")
    if not path.exists():
        if hub_offline():
            raise RuntimeError(f"clean-fid's Inception weights are not cached ({path} is missing) and "
                               f"HF_HUB_OFFLINE=1 forbids downloading them: {how}")
        try:
            check_download_inception(fpath=str(CLEANFID_INCEPTION_DIR))
        except OSError as error:
            path.unlink(missing_ok=True)  # clean-fid writes straight into the file: drop a partial download
            raise RuntimeError(f"clean-fid's Inception weights are not cached ({path} is missing) and downloading "
                               f"them failed ({error}): {how}") from error
    if not zipfile.is_zipfile(path):
        raise RuntimeError(f"clean-fid's Inception weights at {path} are damaged (not a TorchScript archive, e.g. "
                           f"an interrupted download): delete the file and {how}")
    return path


def _paper_clip_scorer_or_explain() -> PaperClipScorer:
    """:func:`~wadi_core.eval.paper_clip_scorer`, its failures turned into a RuntimeError saying what to do."""
    how = "or pass clip_scorer=<a callable (images, prompts) -> mean cosine> to test the protocol's code path"
    try:
        return paper_clip_scorer()
    except ImportError as error:
        raise RuntimeError(f"the paper CLIP score needs open_clip: pip install open_clip_torch, {how}") from error
    except (OSError, RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"open_clip could not load {PAPER_CLIP_MODEL} / {PAPER_CLIP_PRETRAINED} ({error}): run once with network "
            f"so that open_clip caches its weights (~5 GB) in the Hugging Face cache, {how}"
        ) from error


def _captions(protocol: str, annotations: Path, n: int | None) -> tuple[list[str], list[str] | None]:
    """The protocol's prompts (the first ``n``) and the reference file names (None: all of the images folder)."""
    annotations = Path(annotations)
    if protocol == "coco2017-5k":
        entries = coco2017_5k(annotations)
        prompts, reference = [c.caption for c in entries], [c.file_name for c in entries]
    elif annotations.suffix.lower() == ".json":  # captions_val2014.json: the seeded 30k draw
        _, captions = _load_annotations(annotations)
        pool = min(COCO14_PROMPTS, sum(1 for c in captions.values() if c))  # a stand-in set may hold fewer images
        prompts, reference = [c.caption for c in coco2014_30k(annotations, n=pool)], None
    else:  # a caption list, one caption per line (DMD2's captions_coco14_test.txt)
        prompts, reference = coco2014_30k_captions(path=annotations, n=None), None
    if n is not None:
        if n > len(prompts):
            raise ValueError(f"asked for n={n} images but {protocol} on {str(annotations)!r} has {len(prompts)} "
                             "captions")
        prompts = prompts[:n]
    if len(prompts) < 2:
        raise ValueError(f"FID needs at least 2 images, but {protocol} would generate {len(prompts)} (n={n})")
    return prompts, reference


def _record_prompts(path: Path, prompts: list[str]) -> None:
    """Write the prompts of ``out_dir`` (one per line); a resumed run must extend the earlier list, not change it."""
    if path.exists():
        earlier = path.read_text(encoding="utf-8").splitlines()
        if earlier != prompts[: len(earlier)]:
            raise ValueError(f"{path.parent} holds images generated for other captions (this run's {len(prompts)} "
                             f"captions do not extend the {len(earlier)} in {path.name}: another protocol, caption "
                             "file or a smaller n): use a fresh out_dir")
    atomic_write_text(path, "".join(p + "\n" for p in prompts))


def _resized(source: Path, target: Path, size: int, files: list[str] | None, role: str, progress: bool) -> Path:
    """:func:`~wadi_core.eval.center_crop_resize_folder`, checked to hold exactly the resized ``files``."""
    sources = [source / f for f in files] if files is not None else image_files(source)
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {role} images not found, e.g. {missing[0]!r}")
    center_crop_resize_folder(source, target, size, progress=progress, files=files)
    expected = {path.stem + ".png" for path in sources}
    found = {str(path.relative_to(target)) for path in image_files(target)}
    if found != expected:
        raise ValueError(f"{role} folder {str(target)!r} holds {len(found - expected)} images not from "
                         f"{str(source)!r} (built for another set): use a fresh folder")
    return target


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _clip_value(folder: Path, prompts: list[str], scorer: PaperClipScorer | ClipScorer) -> float:
    """Mean CLIP cosine over the resized generated images, scored :data:`CLIP_CHUNK` at a time (chunk means weighted
    by their sizes: the mean over all images)."""
    total = 0.0
    for start in range(0, len(prompts), CLIP_CHUNK):
        chunk = prompts[start : start + CLIP_CHUNK]
        pixels = np.stack([_read_rgb(folder / f"{start + i:06d}.png") for i in range(len(chunk))])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        if isinstance(scorer, PaperClipScorer):
            total += clip_score_paper(images, chunk, scorer) * len(chunk)
        else:
            total += float(scorer(images, chunk)) * len(chunk)
    return total / len(prompts)


def coco_protocol(generate: GenerateFn, annotations: Path, images_dir: Path, protocol: str, out_dir: Path, *,
                  n: int | None = None, features: ShapesFeatureNet | None = None,
                  clip_scorer: PaperClipScorer | ClipScorer | None = None, batch_size: int = 16, seed: int = 0,
                  resolution: int = COCO_EVAL_SIZE, reference_dir: Path | None = None,
                  progress: bool = True) -> dict:
    """FID and CLIP score of ``generate`` on a COCO protocol (SwiftBrush-v2's evaluation), resumable.

    Steps: load the captions (the first ``n``); centre-crop + resize the reference images to ``resolution``
    (``coco2014-30k``: every image of ``images_dir``, as SwiftBrush-v2's ``tools/resize.py``; ``coco2017-5k``:
    the captioned val2017 images); write one image per caption as ``out_dir/generated/%06d.png`` (existing PNGs
    are kept) and their resized copies in ``out_dir/generated-<resolution>``; FID with clean-fid (``mode="clean"``)
    and the CLIP score on the resized images; ``out_dir/eval_manifest.json``. The captions used are written to
    ``out_dir/prompts.txt``; a rerun must use the same ones (a larger ``n`` extends a partial run).

    Args:
        generate: ``generate(prompts, indices) -> images`` in [0, 1] (B, 3, H, W), as for
            :func:`~wadi_core.eval.generate_to_folder`; e.g. :func:`one_step_generator` ``(student, backbone)``.
        annotations: ``captions_val2014.json`` (30k captions drawn with seed 2024, :func:`coco2014_30k`) or a
            caption list, one per line (DMD2's ``captions_coco14_test.txt``) for ``coco2014-30k``;
            ``captions_val2017.json`` for ``coco2017-5k``.
        images_dir: the real images (``val2014/`` or ``val2017/``).
        protocol: ``"coco2014-30k"`` or ``"coco2017-5k"``.
        out_dir: output folder of this evaluation.
        n: number of captions (None: all of the protocol's); the reference set does not depend on it.
        features: a stand-in feature network for FID (e.g. a :class:`~wadi_core.eval.ShapesFeatureNet` built for
            ``resolution``); None: clean-fid's Inception, whose weights are checked (or downloaded) first.
        clip_scorer: None: the paper's open_clip ViT-g-14 (:func:`~wadi_core.eval.paper_clip_scorer`, loaded
            first); a :class:`~wadi_core.eval.PaperClipScorer`; or any ``scorer(images, prompts) -> float``
            returning the mean cosine of images in [0, 1] (B, 3, resolution, resolution) with their prompts.
        batch_size: prompts per ``generate`` call.
        seed: :func:`~wadi_core.eval.generate_to_folder`'s fallback seed for a ``generate`` that draws from the
            global RNG; recorded in the manifest.
        resolution: side of the centre-cropped, LANCZOS-resized images (256 in the protocol).
        reference_dir: folder of the resized reference images (default ``out_dir/reference-<resolution>``); share
            one between evaluations of the same protocol and ``images_dir`` to resize them once.
        progress: show tqdm bars.

    Returns:
        ``{"FID": float, "CLIP score (cosine)": float, "images": n, "manifest": Path}``.

    Raises:
        RuntimeError: clean-fid's Inception (``features=None``) or open_clip and its weights
            (``clip_scorer=None``) are not available; checked before anything is generated.
        ValueError: unknown ``protocol``, ``n`` too large or below 2, or ``out_dir`` holds another run's images.
        FileNotFoundError: the annotations, the images folder or a reference image is missing.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown COCO protocol {protocol!r}; choose one of {PROTOCOLS}")
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO images folder {str(images_dir)!r} not found (val2014/ or val2017/ from "
                                "cocodataset.org)")
    prompts, reference_files = _captions(protocol, annotations, n)
    if features is None:
        require_cleanfid_inception()
    scorer = _paper_clip_scorer_or_explain() if clip_scorer is None else clip_scorer
    out_dir.mkdir(parents=True, exist_ok=True)
    _record_prompts(out_dir / "prompts.txt", prompts)
    reference = _resized(images_dir, Path(reference_dir or out_dir / f"reference-{resolution}"), resolution,
                         reference_files, "reference", progress)
    generated_dir = out_dir / "generated"
    generate_to_folder(generate, prompts, generated_dir, batch_size=batch_size, seed=seed, progress=progress)
    generated = _resized(generated_dir, out_dir / f"generated-{resolution}", resolution,
                         [f"{i:06d}.png" for i in range(len(prompts))], "generated", progress)
    fid_value = fid(generated, reference, features=features, mode="clean")
    clip_value = _clip_value(generated, prompts, scorer)
    if isinstance(scorer, PaperClipScorer):
        clip_model = f"open_clip {PAPER_CLIP_MODEL} / {PAPER_CLIP_PRETRAINED}, prefix {scorer.prefix!r}"
    else:
        clip_model = f"stand-in {getattr(scorer, '__qualname__', type(scorer).__qualname__)}"
    manifest_path = out_dir / "eval_manifest.json"
    write_eval_manifest(
        manifest_path, caption_file=out_dir / "prompts.txt", protocol=protocol, annotations=str(annotations),
        annotations_sha256=file_sha256(Path(annotations)), images_dir=str(images_dir), images=len(prompts),
        reference_dir=str(reference), reference_size=len(image_files(reference)), generated_dir=str(generated),
        resolution=resolution, resize="centre crop + PIL LANCZOS", seed=seed, batch_size=batch_size,
        fid_extractor=extractor_identity(features, "clean"), clip_model=clip_model, safety_checker=False,
        FID=fid_value, clip_score_cosine=clip_value,
    )
    return {"FID": fid_value, "CLIP score (cosine)": clip_value, "images": len(prompts), "manifest": manifest_path}


def write_coco_stand_in(folder: Path, images: torch.Tensor, captions: Sequence[str | Sequence[str]],
                        split: str = "val2014", image_format: str = "jpg") -> tuple[Path, Path]:
    """A COCO-format stand-in set: ``folder/annotations/captions_<split>.json`` and the images in ``folder/<split>/``.

    The JSON has COCO's ``images`` (id, file_name, height, width) and ``annotations`` (id, image_id, caption)
    lists; image ids are 1, 2, ... and annotation ids count up in caption order. File names follow COCO's
    (``COCO_val2014_%012d.jpg`` for the 2014 splits, ``%012d.jpg`` otherwise), so :func:`coco2014_30k`,
    :func:`coco2017_5k` and :func:`coco_protocol` read the set like the real one.

    Args:
        folder: output folder.
        images: (B, 3, H, W) floats in [0, 1] or uint8 (e.g. ShapesWorld's ``make_split(...).images``).
        captions: per image, a caption or a list of captions (COCO has 5; one or two make a stand-in).
        split: COCO split name (``val2014``, ``val2017``).
        image_format: ``"jpg"`` (quality 95, like COCO) or ``"png"`` (lossless).

    Returns:
        (annotations JSON path, images folder).
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption entries")
    pixels = images if images.dtype == torch.uint8 else (images.detach().float().cpu().clamp(0, 1) * 255).round()
    pixels = pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    folder = Path(folder)
    images_dir, annotations = folder / split, folder / "annotations" / f"captions_{split}.json"
    images_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"COCO_{split}_" if "2014" in split else ""
    records, notes = [], []
    for index, (array, entry) in enumerate(zip(pixels, captions)):
        image_id = index + 1
        texts = [entry] if isinstance(entry, str) else list(entry)
        if not texts:
            raise ValueError(f"image {index} has no caption")
        file_name = f"{prefix}{image_id:012d}.{image_format}"
        if image_format == "png":
            _write_png(array, images_dir / file_name)
        else:
            Image.fromarray(array).save(images_dir / file_name, format="JPEG", quality=95)
        records.append({"id": image_id, "file_name": file_name, "height": int(array.shape[0]),
                        "width": int(array.shape[1])})
        notes += [{"id": len(notes) + k + 1, "image_id": image_id, "caption": text} for k, text in enumerate(texts)]
    annotations.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(annotations, json.dumps({"images": records, "annotations": notes}, indent=1) + "\n")
    return annotations, images_dir

