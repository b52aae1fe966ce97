"""The COCO zero-shot protocols of the paper profile (``docs/paper_notes.md#evaluation-protocols``).

- **COCO-2014 30k** (Table 1): 30,000 val2014 captions, one image per caption; either a supplied caption list
  (e.g. DMD2's ``captions_coco14_test.txt``, one caption per line) or a seeded sample of one caption per image
  from the official ``captions_val2014.json``.
- **COCO-2017 5k**: the 5,000 val2017 images, each with its first caption (lowest annotation id).
- Real and generated images are centre-cropped to a square and LANCZOS-resized to 256 before clean-fid, as in
  SwiftBrush-v2's and DMD2's public evaluation code (both after GigaGAN).
- Every frozen choice (caption file hash, seeds, resolution, reference set size) goes into an eval manifest.

No COCO file ships with the repository: pass your own paths. A 30k caption list can also be named once in the
environment variable ``WADI_COCO14_CAPTIONS`` (see :func:`coco2014_caption_list_path`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..artifacts import atomic_write_text
from .fid import _write_png, file_sha256, image_files

COCO_EVAL_SIZE = 256  # centre-crop + LANCZOS resize of real and generated images (GigaGAN, DMD2, SBv2)
COCO14_CAPTIONS_ENV = "WADI_COCO14_CAPTIONS"  # path of a COCO-2014 30k caption list, one caption per line


@dataclass(frozen=True)
class CocoCaption:
    """One evaluation prompt: the COCO image it describes and the caption."""

    image_id: int
    file_name: str
    caption: str


def _clean(caption: str) -> str:
    return " ".join(caption.split())  # one line: COCO captions hold stray newlines and double spaces


def _load_annotations(annotations_json: Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """(image id → file name, image id → [(annotation id, caption)]) of a COCO captions JSON."""
    path = Path(annotations_json)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO captions file {str(path)!r} not found; download annotations_trainval2014.zip / "
            "annotations_trainval2017.zip from cocodataset.org and pass captions_val2014.json / captions_val2017.json"
        )
    data = json.loads(path.read_text())
    files = {image["id"]: image["file_name"] for image in data["images"]}
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append((ann["id"], _clean(ann["caption"])))
    return files, captions


def coco2014_30k(annotations: Path, seed: int = 2024, n: int = 30_000) -> list[CocoCaption]:
    """``n`` val2014 images drawn with ``seed``, each with one caption drawn with the same RNG.

    Deterministic: images are sorted by id, sampled without replacement with ``random.Random(seed)``, and returned
    in sorted id order; each image's captions are sorted by annotation id before one is chosen.
    """
    files, captions = _load_annotations(annotations)
    ids = sorted(i for i in files if captions.get(i))
    if n > len(ids):
        raise ValueError(f"asked for {n} captions but {annotations} has {len(ids)} captioned images")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(ids, n))
    return [CocoCaption(i, files[i], rng.choice(sorted(captions[i]))[1]) for i in chosen]


def coco2014_30k_captions(path: Path | None = None, annotations: Path | None = None, seed: int = 2024,
                          n: int | None = 30_000) -> list[str]:
    """The COCO-2014 30k prompts: from a caption list file or sampled from ``captions_val2014.json``.

    Args:
        path: text file, one caption per line (e.g. DMD2's ``captions_coco14_test.txt``); the first ``n`` lines
            are used, in file order (``seed`` is ignored).
        annotations: the official ``captions_val2014.json``; see :func:`coco2014_30k`.
        seed: sampling seed for ``annotations``.
        n: number of captions (None: every line of ``path``).
    """
    if (path is None) == (annotations is None):
        raise ValueError("pass exactly one of path= (a caption list, one per line) or annotations= "
                         "(captions_val2014.json)")
    if annotations is not None:
        return [c.caption for c in coco2014_30k(annotations, seed, 30_000 if n is None else n)]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption list {str(path)!r} not found (one caption per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if n is not None and len(lines) < n:
        raise ValueError(f"asked for {n} captions but {str(path)!r} has {len(lines)} lines")
    return [line.strip() for line in lines[:n]]


def coco2014_caption_list_path() -> Path | None:
    """The caption list named by ``WADI_COCO14_CAPTIONS``, or None when the variable is unset or empty.

    Pass the result to :func:`coco2014_30k_captions`. A variable that names a missing file raises, so that a
    wrong path is not mistaken for "no caption list configured".
    """
    value = os.environ.get(COCO14_CAPTIONS_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{COCO14_CAPTIONS_ENV}={value!r} does not name a file (a COCO-2014 caption list, "
                                "one caption per line, e.g. DMD2's captions_coco14_test.txt)")
    return path


def coco2017_5k(annotations_json: Path) -> list[CocoCaption]:
    """Every val2017 image (5,000) with its first caption (lowest annotation id), sorted by image id."""
    files, captions = _load_annotations(annotations_json)
    return [CocoCaption(i, files[i], min(captions[i])[1]) for i in sorted(files) if captions.get(i)]


def center_crop_resize(image, size: int = COCO_EVAL_SIZE):
    """Centre-crop to a square (the short edge) and resize to ``size`` × ``size`` with PIL LANCZOS.

    Accepts a PIL image or an (H, W, 3) uint8 array and returns the same kind.
    """
    as_array = isinstance(image, np.ndarray)
    pil = Image.fromarray(image) if as_array else image
    width, height = pil.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    out = pil.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(out) if as_array else out


def center_crop_resize_folder(source: Path, target: Path, size: int = COCO_EVAL_SIZE, progress: bool = True,
                              files: list[str] | None = None) -> Path:
    """Write :func:`center_crop_resize`-d PNG copies of a folder's images (resumable: existing files are kept).

    Use it on the real COCO images (``files``: e.g. the ``file_name`` of :func:`coco2017_5k`) and on generated
    images that are not yet at ``size``; the result is the folder to pass to :func:`~wadi_core.eval.fid`.
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {str(source)!r} not found")
    paths = [source / f for f in files] if files is not None else image_files(source)
    target.mkdir(parents=True, exist_ok=True)
    for path in tqdm(paths, desc=f"crop+resize → {target.name}", disable=not progress):
        out = target / (path.stem + ".png")
        if not out.exists():
            with Image.open(path) as image:
                _write_png(np.asarray(center_crop_resize(image.convert("RGB"), size)), out)
    return target


def write_eval_manifest(path: Path, caption_file: Path | None = None, **frozen_choices) -> dict:
    """Atomically write the frozen choices of an evaluation as JSON (sorted keys) and return them.

    Record at least the seeds, the resolution and the reference set size (they vary between papers), e.g.
    ``write_eval_manifest(p, caption_file=..., seed=2024, resolution=256, reference_size=40504,
    clip_model="ViT-g-14", safety_checker=False)``. ``caption_file`` adds its path, SHA-256 and line count;
    the clean-fid version is added too.
    """
    manifest = dict(frozen_choices)
    if caption_file is not None:
        caption_file = Path(caption_file)
        if not caption_file.is_file():
            raise FileNotFoundError(f"caption file {str(caption_file)!r} not found")
        manifest["caption_file"] = str(caption_file)
        manifest["caption_file_sha256"] = file_sha256(caption_file)
        manifest["caption_count"] = len(caption_file.read_text(encoding="utf-8").splitlines())
    manifest.setdefault("clean_fid_version", importlib.metadata.version("clean-fid"))
    atomic_write_text(Path(path), json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return json.loads(Path(path).read_text())
