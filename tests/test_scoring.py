"""score_images: every Table 1 metric of a set of images at once, equal to the individual functions."""

import pytest
import torch
from transformers import CLIPModel

from wadi_core.backbones.tiny import clip_model_config, train_tokenizer
from wadi_core.eval import (
    ShapesFeatureNet,
    attribute_accuracy,
    clip_score,
    fid,
    folder_features,
    precision_recall,
    save_images,
    score_images,
)
from wadi_core.profiles import ClipTrainConfig, WorldConfig
from wadi_core.world import make_split

WORLD = WorldConfig(train_size=64, validation_size=40, coco14_size=60, coco17_size=60)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    torch.manual_seed(0)
    net = ShapesFeatureNet(feature_dim=16).eval()
    generated = make_split("coco14-like", WORLD)
    real = make_split("coco17-like", WORLD)
    reference = tmp_path_factory.mktemp("reference")
    save_images(real.images.float() / 255, reference)
    tokenizer = train_tokenizer(make_split("validation", WORLD).captions, ClipTrainConfig())
    clip = CLIPModel(clip_model_config(ClipTrainConfig(), tokenizer, 32)).eval()
    return net, generated.images.float() / 255, generated.captions, reference, clip, tokenizer


def test_score_images_equals_the_individual_metrics(setting, tmp_path):
    net, images, prompts, reference, clip, tokenizer = setting
    scores = score_images(images, prompts, reference, features=net, clip=clip, tokenizer=tokenizer,
                          precision_recall_k=3, name="test")
    own = tmp_path / "own"
    save_images(images, own)
    assert scores["FID"] == pytest.approx(fid(own, reference, features=net), rel=1e-9)
    assert scores["CLIP score (cosine)"] == pytest.approx(clip_score(clip, tokenizer, images, prompts), abs=1e-9)
    expected = precision_recall(folder_features(own, net), folder_features(reference, net), k=3)
    assert (scores["precision"], scores["recall"]) == pytest.approx((expected["precision"], expected["recall"]))
    accuracy = attribute_accuracy(net, images, prompts)
    assert {k: scores[f"acc. {k}"] for k in accuracy} == pytest.approx(accuracy)
    assert list(scores)[:4] == ["FID", "CLIP score (cosine)", "precision", "recall"]


def test_score_images_skips_precision_recall_unless_asked_and_checks_its_input(setting):
    net, images, prompts, reference, clip, tokenizer = setting
    scores = score_images(images, prompts, reference, features=net, clip=clip, tokenizer=tokenizer)
    assert "precision" not in scores and "recall" not in scores and "acc. all" in scores
    with pytest.raises(ValueError, match="60 images but 59 prompts"):
        score_images(images, prompts[:-1], reference, features=net, clip=clip, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        score_images(images, prompts, reference, features=net, clip=clip)
