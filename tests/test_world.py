"""ShapesWorld: determinism, captions that match the rendered pixels, disjoint splits, condition maps."""

import hashlib

import numpy as np
import pytest
import torch

from wadi_core.eval import parse_prompt
from wadi_core.profiles import WorldConfig, get_profile
from wadi_core.world import (
    COLORS,
    SPLITS,
    make_split,
    region_of,
    relation_between,
    render_scene,
    sample_scenes,
    size_of,
)

WORLD = WorldConfig(train_size=400, validation_size=50, coco14_size=200, coco17_size=200)


def test_same_seed_same_images_and_other_seed_differs():
    a, b = make_split("train", WORLD, with_maps=True), make_split("train", WORLD, with_maps=True)
    assert a.captions == b.captions
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.edges, b.edges)
    other = make_split("train", WorldConfig(train_size=400, seed=1))
    assert not torch.equal(a.images, other.images)


def test_count_takes_a_prefix_of_the_split():
    full = make_split("coco14-like", WORLD)
    head = make_split("coco14-like", WORLD, count=20)
    assert torch.equal(full.images[:20], head.images) and full.captions[:20] == head.captions


def test_splits_are_disjoint_at_full_tiny_size():
    # At 20,000 training images, quantised rendering makes some random scenes pixel-identical; the held-out
    # splits must skip those (and never repeat an image themselves).
    world = get_profile("tiny").world
    digests = {}
    for split in SPLITS:
        images = make_split(split, world).images
        digests[split] = {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images}
        if split != "train":
            assert len(digests[split]) == len(images), f"{split} repeats an image"
    names = list(digests)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not digests[a] & digests[b], f"{a} and {b} share images"


def _pixel_colour(image: np.ndarray, cx: float, cy: float) -> tuple[int, ...]:
    return tuple(int(v) for v in image[int(round(cy - 0.5)), int(round(cx - 0.5))])


def test_captions_match_rendered_attributes():
    for scene in sample_scenes("train", 300, WORLD):
        image = render_scene(scene)
        spec = parse_prompt(scene.caption)
        assert [(o.color, o.shape) for o in scene.objects] == list(spec.objects)
        for obj in scene.objects:  # the object's own colour is at its centre
            expected = np.array(COLORS[obj.color])
            assert np.abs(np.array(_pixel_colour(image, obj.cx, obj.cy)) - expected).max() <= 8
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert relation_between((a.cx, a.cy), (b.cx, b.cy)) == scene.relation
            assert spec.relation == (None if scene.relation == "above" else scene.relation)
        else:
            obj = scene.objects[0]
            assert region_of(obj.cx, obj.cy) == scene.position
            assert size_of(obj.radius) == scene.size
            assert spec.size == (scene.size if scene.mentions_size else None)
            assert spec.position == (scene.position if scene.mentions_position else None)


def test_above_is_never_said():
    scenes = sample_scenes("train", 2000, WORLD)
    assert all("above" not in s.caption for s in scenes)
    above = [s for s in scenes if s.relation == "above"]
    assert above and all(" and " in s.caption for s in above)


def test_condition_maps_follow_the_objects():
    data = make_split("validation", WORLD, with_maps=True)
    lit = data.images.amax(dim=1, keepdim=True) > 60  # bright pixels are object pixels (black background)
    agreement = (lit == data.masks.bool()).float().mean()
    assert agreement > 0.97
    assert torch.all(data.edges <= data.masks)  # edges lie on the mask
    assert torch.all(data.edges.flatten(1).sum(1) > 0)


def test_unknown_split_and_oversized_request_raise():
    with pytest.raises(ValueError, match="unknown split"):
        make_split("coco", WORLD)
    with pytest.raises(ValueError, match="has 50 images"):
        make_split("validation", WORLD, count=51)
