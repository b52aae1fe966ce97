"""Evaluation as a few flat functions (clean-fid's style): FID, CLIP score, attribute accuracy."""

from .attributes import PromptSpec, attribute_accuracy, attribute_table, parse_prompt, read_objects
from .clip_score import clip_score
from .features import ShapesFeatureNet, load_or_train_feature_net, train_feature_net
from .fid import feature_extractor, fid, image_folder, reference_folder, save_images
