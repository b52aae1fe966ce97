"""Evaluation functions: clean-fid path, attribute reading, CLIP score."""

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid

from wadi_core.eval import (
    ShapesFeatureNet,
    attribute_accuracy,
    attribute_table,
    clip_score,
    feature_extractor,
    fid,
    parse_prompt,
    save_images,
    temporary_image_folder,
)
from wadi_core.eval.fid import _keep_native_resolution
from wadi_core.profiles import WorldConfig
from wadi_core.world import make_split

WORLD = WorldConfig(train_size=64, validation_size=8, coco14_size=200, coco17_size=200)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """FID reference statistics are cached under WADI_CACHE_DIR: keep them out of the repository's .cache."""
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    a = make_split("coco14-like", WORLD)
    b = make_split("coco17-like", WORLD)
    save_images(a.images.float() / 255, root / "a")
    save_images(b.images.float() / 255, root / "b")
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ShapesFeatureNet(feature_dim=16).eval()


def test_fid_is_clean_fid_with_our_extractor(folders, net):
    ours = fid(*folders, features=net)
    direct = cleanfid.compute_fid(
        str(folders[0]), str(folders[1]), mode="clean", custom_feat_extractor=feature_extractor(net),
        custom_fn_resize=_keep_native_resolution, device=torch.device("cpu"), num_workers=0, verbose=False,
    )
    assert ours == pytest.approx(direct, rel=1e-9)
    assert ours > 0


def test_fid_of_a_set_with_itself_is_zero(folders, net):
    assert fid(folders[0], folders[0], features=net) == pytest.approx(0.0, abs=1e-3)


def test_temporary_image_folders_are_private_and_removed():
    images = torch.rand(3, 3, 8, 8)
    with temporary_image_folder(images, "student") as first, temporary_image_folder(images[:2], "student") as second:
        assert first != second and first.name.startswith("student-")  # side-by-side scorers never share a folder
        assert len(list(first.glob("*.png"))) == 3 and len(list(second.glob("*.png"))) == 2
    assert not first.exists() and not second.exists()


def test_fid_needs_image_folders(tmp_path, folders, net):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder of images"):
        fid(tmp_path / "empty", folders[0], features=net)


def test_save_images_is_exact_and_resumable(tmp_path):
    images = torch.rand(3, 3, 8, 8)
    paths = save_images(images, tmp_path / "x")
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = save_images(torch.zeros(3, 3, 8, 8), tmp_path / "x")  # existing files are kept
    assert [p.stat().st_mtime_ns for p in again] == mtimes
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[0])), (images[0] * 255).round().byte().permute(1, 2, 0).numpy())


@pytest.mark.parametrize(
    "prompt, objects, relation, size, position",
    [
        ("a red circle", (("red", "circle"),), None, None, None),
        ("a large blue square at the top left", (("blue", "square"),), None, "large", "top left"),
        ("a small green triangle in the center", (("green", "triangle"),), None, "small", "center"),
        ("a red circle left of a blue square", (("red", "circle"), ("blue", "square")), "left of", None, None),
        ("a red circle below a blue square", (("red", "circle"), ("blue", "square")), "below", None, None),
        ("a red circle and a blue square", (("red", "circle"), ("blue", "square")), None, None, None),
        ("a red circle above a blue square", (("red", "circle"), ("blue", "square")), "above", None, None),
    ],
)
def test_parse_prompt(prompt, objects, relation, size, position):
    spec = parse_prompt(prompt)
    assert (spec.objects, spec.relation, spec.size, spec.position) == (objects, relation, size, position)


@pytest.mark.parametrize("bad", ["a purple circle", "two red circles", "a red circle on a blue square", ""])
def test_parse_prompt_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not a ShapesWorld prompt"):
        parse_prompt(bad)


class _OracleReader(torch.nn.Module):
    """Reads the known answer for a fixed batch: lets the accuracy bookkeeping be tested on its own."""

    def __init__(self, presence, geometry):
        super().__init__()
        self.presence, self.geometry = presence, geometry

    def forward(self, images):
        return self.presence[: len(images)] * 20 - 10, self.geometry[: len(images)]


def test_attribute_accuracy_is_one_for_the_truth_and_catches_wrong_objects():
    from wadi_core.world import object_targets

    data = make_split("coco14-like", WORLD, count=50)
    presence, geometry = object_targets(data.scenes)
    images = data.images.float() / 255
    truth = attribute_accuracy(_OracleReader(presence, geometry), images, data.captions)
    assert all(v == 1.0 for v in truth.values())
    swapped = presence.roll(1, dims=1)  # every object read as another class
    table = attribute_table(_OracleReader(swapped, geometry.roll(1, dims=1)), images, data.captions)
    assert not table["objects"].any() and not table["all"].any()


def test_clip_score_is_batch_size_invariant_and_checks_lengths():
    from transformers import CLIPModel

    from wadi_core.backbones.tiny import clip_model_config, train_tokenizer
    from wadi_core.profiles import ClipTrainConfig

    data = make_split("validation", WORLD)
    config = ClipTrainConfig()
    tokenizer = train_tokenizer(data.captions, config)
    torch.manual_seed(0)
    model = CLIPModel(clip_model_config(config, tokenizer, 32)).eval()
    images = data.images.float() / 255
    a = clip_score(model, tokenizer, images, data.captions, batch_size=8)
    b = clip_score(model, tokenizer, images, data.captions, batch_size=3)
    assert a == pytest.approx(b, abs=1e-6) and -1 <= a <= 1
    with pytest.raises(ValueError, match="8 images but 7 prompts"):
        clip_score(model, tokenizer, images, data.captions[:7])


def test_feature_net_shapes(net):
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    logits, geometry = net(images)
    assert logits.shape == (5, 12) and geometry.shape == (5, 12, 3)
    assert net.features(images).shape == (5, net.feature_dim)
