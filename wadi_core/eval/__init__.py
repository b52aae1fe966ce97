"""Evaluation as a few flat functions (clean-fid's style): FID, precision/recall, CLIP score, attribute
accuracy, all of them at once (:func:`score_images`), the COCO protocols and resumable sample generation."""

from .attributes import PromptSpec, attribute_accuracy, attribute_table, parse_prompt, read_objects
from .clip_score import PaperClipScorer, clip_score, clip_score_paper, paper_clip_scorer
from .coco import (
    CocoCaption,
    center_crop_resize,
    center_crop_resize_folder,
    coco2014_30k,
    coco2014_30k_captions,
    coco2017_5k,
    write_eval_manifest,
)
from .features import ShapesFeatureNet, load_or_train_feature_net, train_feature_net
from .fid import (
    ReferenceStats,
    feature_extractor,
    fid,
    file_sha256,
    folder_features,
    reference_folder,
    reference_stats,
    save_images,
    temporary_image_folder,
)
from .manifold import precision_recall
from .protocols import PROTOCOLS, coco_protocol, one_step_generator, require_cleanfid_inception, write_coco_stand_in
from .samples import CachedSamples, cached_samples, generate_to_folder, one_step_key, per_image_noise, samples_key
from .scoring import image_scorer, recorded_scores, score_images, student_scorer
