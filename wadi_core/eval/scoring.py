"""Score a set of generated images with every metric of Table 1 at once, the same way in every notebook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPModel, CLIPTokenizer

from ..artifacts import load_or_compute_record, module_digest, prompts_digest
from ..distill import one_step_generate
from .attributes import attribute_accuracy
from .clip_score import PaperClipScorer, clip_score, clip_score_paper
from .features import ShapesFeatureNet
from .fid import fid, folder_features, temporary_image_folder
from .manifold import precision_recall


def score_images(images: torch.Tensor, prompts: list[str], reference: Path, *, features: ShapesFeatureNet | None,
                 clip: CLIPModel | PaperClipScorer, tokenizer: CLIPTokenizer | None = None,
                 precision_recall_k: int | None = None, name: str = "scored") -> dict[str, float]:
    """FID, CLIP score, optionally precision/recall, and (tiny world) attribute accuracy of ``images``.

    Table 1's columns (WaDi arXiv 2603.08258): FID with clean-fid against the real images in ``reference``, the CLIP
    score as the raw cosine (≈0.3 on SD, never ×100), improved precision/recall with ``k`` neighbours (the
    SwiftBrush-v2 evaluation uses k = 3). In the tiny world the feature network stands in for Inception and also
    reads the attributes back (``acc. <attribute>`` keys, see :func:`~wadi_core.eval.attribute_accuracy`).

    Args:
        images: (B, 3, H, W) in [0, 1], image i generated for ``prompts[i]``.
        prompts: one prompt per image.
        reference: folder of real reference PNGs (e.g. :func:`~wadi_core.eval.reference_folder`).
        features: the ShapesWorld feature network (FID features and attribute reader); None uses clean-fid's
            Inception and skips the attributes (paper world).
        clip: the tiny CLIP model (with ``tokenizer``) or an open_clip :class:`PaperClipScorer` (paper world).
        tokenizer: the tiny CLIP's tokenizer; required with a ``CLIPModel``.
        precision_recall_k: neighbours for precision/recall; None skips them.
        name: prefix of the private cache folder the images are written to as PNGs for clean-fid (removed after).

    Returns:
        ``{"FID", "CLIP score (cosine)", ["precision", "recall"], ["acc. objects", "acc. colors", ...]}``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if isinstance(clip, PaperClipScorer):
        clip_value = clip_score_paper(images, prompts, clip)
    elif tokenizer is None:
        raise ValueError("the tiny CLIP score needs its tokenizer: pass the tiny CLIP's (.tokenizer)")
    else:
        clip_value = clip_score(clip, tokenizer, images, prompts)
    with temporary_image_folder(images, name) as folder:
        scores = {"FID": fid(folder, reference, features=features), "CLIP score (cosine)": clip_value}
        if precision_recall_k is not None:
            scores.update(precision_recall(folder_features(folder, features), folder_features(reference, features),
                                           k=precision_recall_k))
    if features is not None:
        scores.update({f"acc. {key}": value for key, value in attribute_accuracy(features, images, prompts).items()})
    return scores


def image_scorer(prompts: list[str], reference: Path, *, features: ShapesFeatureNet, clip: CLIPModel,
                 tokenizer: CLIPTokenizer, precision_recall_k: int = 3,
                 name: str = "images") -> tuple[Callable[[torch.Tensor], dict[str, float]], dict]:
    """``(evaluate, score_key)``: ``evaluate(images)`` is :func:`score_images` of images of ``prompts``, and
    ``score_key`` names what determines it besides the images (the prompts' hash, the feature network's digest,
    ``k``), for records of image scores such as :func:`wadi_core.distill.world_study`'s."""

    def evaluate(images: torch.Tensor) -> dict[str, float]:
        return score_images(images, prompts, reference, features=features, clip=clip, tokenizer=tokenizer,
                            precision_recall_k=precision_recall_k, name=name)

    key = {"prompts": prompts_digest(prompts), "features": module_digest(features),
           "precision_recall_k": precision_recall_k}
    return evaluate, key


def student_scorer(backbone, prompts: list[str], reference: Path, *, features: ShapesFeatureNet, clip: CLIPModel,
                   tokenizer: CLIPTokenizer, seed: int, precision_recall_k: int = 3,
                   name: str = "student") -> tuple[Callable[[torch.nn.Module], dict[str, float]], dict]:
    """``(score, score_key)`` for notebook 03's studies (:mod:`wadi_core.distill.studies`): ``score(student)`` is
    :func:`image_scorer`'s score of the student's one-step images of ``prompts`` on the noise of ``seed``, and
    ``score_key`` is its key with the seed, so that a record scored by one caller is read back by another."""
    evaluate, key = image_scorer(prompts, reference, features=features, clip=clip, tokenizer=tokenizer,
                                 precision_recall_k=precision_recall_k, name=name)

    def score(student: torch.nn.Module) -> dict[str, float]:
        return evaluate(one_step_generate(student, backbone, prompts, seed))

    return score, {**key, "seed": seed}


IMAGE_SCORES_KIND = "image_scores"


def recorded_scores(images_key: dict, images: Callable[[], torch.Tensor], evaluate: Callable[[torch.Tensor], dict],
                    score_key: dict, label: str = "image scores") -> dict[str, float]:
    """``evaluate(images())``, kept as an ``image_scores`` record keyed by ``images_key`` (everything that determines
    the images, e.g. :func:`~wadi_core.eval.samples.samples_key`) and ``score_key`` (:func:`image_scorer`'s): the
    images are made and scored only when no record holds their scores."""

    def compute() -> dict[str, float]:
        return {name: float(value) for name, value in evaluate(images()).items()}

    return load_or_compute_record(IMAGE_SCORES_KIND, {"images": images_key, "score": score_key}, compute, label=label)
