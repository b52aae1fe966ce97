"""The one-step student's downstream tasks (WaDi's last section; notebook 05), one file per task: ControlNet
(:mod:`.controlnet`), ScaleCrafter-style high-resolution synthesis with re-dilated convolutions (:mod:`.highres`),
ReVersion-style relation inversion (:mod:`.reversion`) and DreamBooth-style customisation (:mod:`.dreambooth`)."""

from . import dreambooth, reversion
from .controlnet import (
    CONDITIONS,
    ControlledDenoiser,
    cached_controlnet_samples,
    control_images,
    controlnet_one_step,
    controlnet_pipeline,
    controlnet_sample,
    controlnet_samples_key,
    load_or_train_controlnet,
    mask_iou,
    object_components,
    object_mask,
    one_step_controlnet_key,
    seconds_per_image,
    train_controlnet,
)
from .highres import (
    count_objects,
    image_size,
    one_step_at_size,
    one_step_at_size_key,
    read_dilation_settings,
    redilated,
    redilation_settings,
    repetition_rate,
    to_training_size,
)

__all__ = ["CONDITIONS", "ControlledDenoiser", "cached_controlnet_samples", "control_images", "controlnet_one_step",
           "controlnet_pipeline", "controlnet_sample", "controlnet_samples_key", "count_objects", "image_size",
           "load_or_train_controlnet", "mask_iou", "object_components", "object_mask", "one_step_at_size",
           "one_step_at_size_key", "one_step_controlnet_key", "read_dilation_settings", "redilated",
           "redilation_settings", "repetition_rate", "reversion", "dreambooth", "seconds_per_image",
           "to_training_size", "train_controlnet"]
