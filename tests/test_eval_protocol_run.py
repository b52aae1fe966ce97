"""The COCO protocols end to end on a COCO-format stand-in set of ShapesWorld images, with a random feature network
for Inception and a stand-in CLIP scorer: captions, reference and generated folders, FID, resume, the manifest,
and the up-front errors when clean-fid's Inception or open_clip is missing."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wadi_core.backbones import load_backbone
from wadi_core.eval import (
    ShapesFeatureNet,
    coco2014_30k,
    coco2017_5k,
    coco_protocol,
    one_step_generator,
    protocols,
    write_coco_stand_in,
)
from wadi_core.profiles import get_profile
from wadi_core.world import make_split

SET_SIZE = 40


@pytest.fixture(autouse=True)
def _dirs_in_tmp(tmp_path, monkeypatch):
    """FID statistics and artifacts go to temporary folders, never the repository's."""
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path / "data"))


def _captions_of(dataset) -> list[list[str]]:
    """One caption per image, two for every third image (COCO has several; the first is the scene's own)."""
    return [[c, f"a picture of {c}"] if i % 3 == 0 else [c] for i, c in enumerate(dataset.captions)]


@pytest.fixture(scope="module")
def shapes():
    return make_split("coco14-like", get_profile("smoke").world, count=SET_SIZE)


@pytest.fixture(scope="module")
def stand_ins(shapes, tmp_path_factory):
    """(captions_val2014.json, val2014/) as JPEGs and (captions_val2017.json, val2017/) as PNGs."""
    root = tmp_path_factory.mktemp("coco")
    coco14 = write_coco_stand_in(root, shapes.images, _captions_of(shapes), split="val2014")
    coco17 = write_coco_stand_in(root, shapes.images.float() / 255, _captions_of(shapes), split="val2017",
                                 image_format="png")
    return coco14, coco17


@pytest.fixture(scope="module")
def features():
    """A fixed random ShapesWorld-architecture network at 256 px: clean-fid's ``custom_feat_extractor`` stand-in."""
    torch.manual_seed(0)
    return ShapesFeatureNet(channels=(8, 8, 8), feature_dim=8, resolution=256).eval()


class Calls:
    """A deterministic ``generate(prompts, indices)`` that counts the images it is asked for."""

    def __init__(self, make):
        self.make, self.indices = make, []

    def __call__(self, prompts, indices):
        assert len(prompts) == len(indices)
        self.indices += list(indices)
        return torch.stack([self.make(i) for i in indices])


def _real_images(entries, images_dir):
    """Image i = the real image of caption i, as the reference folder reads it."""
    def make(index):
        with Image.open(images_dir / entries[index].file_name) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    return make


def _noise(index):
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index))


def _mean_brightness(images, prompts):
    """Stand-in CLIP scorer: checks what it is given and returns a mean."""
    assert images.shape == (len(prompts), 3, 256, 256) and all(isinstance(p, str) for p in prompts)
    return float(images.mean())


def test_stand_in_set_is_read_by_the_coco_loaders(shapes, stand_ins):
    (ann14, dir14), (ann17, dir17) = stand_ins
    data = json.loads(ann14.read_text())
    assert ann14.name == "captions_val2014.json" and dir14.name == "val2014"
    assert len(data["images"]) == SET_SIZE and len(data["annotations"]) == SET_SIZE + len(range(0, SET_SIZE, 3))
    assert data["images"][0] == {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 32, "width": 32}
    assert {"id", "image_id", "caption"} == set(data["annotations"][0])
    assert sorted(a["id"] for a in data["annotations"]) == list(range(1, len(data["annotations"]) + 1))
    assert (dir17 / "000000000001.png").is_file()

    drawn = coco2014_30k(ann14, n=12)
    assert len(drawn) == 12 and [c.image_id for c in drawn] == sorted(c.image_id for c in drawn)
    for entry in drawn:
        assert entry.caption in _captions_of(shapes)[entry.image_id - 1]
        assert (dir14 / entry.file_name).is_file()
    first = coco2017_5k(ann17)
    assert [c.caption for c in first] == shapes.captions  # each image's first caption, in image-id order
    with Image.open(dir17 / first[5].file_name) as image:  # PNG: lossless
        assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), shapes.images[5])
    with Image.open(dir14 / drawn[0].file_name) as image:  # JPEG, quality 95: close
        error = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() - shapes.images[drawn[0].image_id - 1]
        assert error.abs().mean() < 8


def test_coco2017_protocol_on_the_real_images_gives_fid_zero_and_resumes(stand_ins, features, tmp_path):
    ann17, dir17 = stand_ins[1]
    entries = coco2017_5k(ann17)
    generate = Calls(_real_images(entries, dir17))
    out = tmp_path / "real"
    result = coco_protocol(generate, ann17, dir17, "coco2017-5k", out, features=features,
                           clip_scorer=_mean_brightness, batch_size=16, progress=False)
    assert sorted(generate.indices) == list(range(SET_SIZE))
    assert result["images"] == SET_SIZE and abs(result["FID"]) < 1e-3
    assert sorted(p.name for p in (out / "generated").iterdir()) == [f"{i:06d}.png" for i in range(SET_SIZE)]
    with Image.open(out / "generated-256" / "000003.png") as image:
        assert image.size == (256, 256)
    assert len(list((out / "reference-256").iterdir())) == SET_SIZE
    assert (out / "prompts.txt").read_text().splitlines() == [c.caption for c in entries]

    manifest = json.loads(result["manifest"].read_text())
    assert result["manifest"] == out / "eval_manifest.json"
    assert manifest["protocol"] == "coco2017-5k" and manifest["images"] == SET_SIZE
    assert manifest["reference_size"] == SET_SIZE and manifest["resolution"] == 256
    assert manifest["caption_count"] == SET_SIZE and manifest["safety_checker"] is False
    assert manifest["FID"] == result["FID"] and manifest["clip_score_cosine"] == result["CLIP score (cosine)"]
    assert manifest["fid_extractor"]["net"]["name"] == "ShapesFeatureNet" and "clean_fid_version" in manifest
    assert "_mean_brightness" in manifest["clip_model"]

    again = coco_protocol(generate, ann17, dir17, "coco2017-5k", out, features=features,
                          clip_scorer=_mean_brightness, progress=False)
    assert len(generate.indices) == SET_SIZE  # resumed: nothing generated again
    assert again["FID"] == result["FID"] and again["CLIP score (cosine)"] == result["CLIP score (cosine)"]

    noise = coco_protocol(Calls(_noise), ann17, dir17, "coco2017-5k", tmp_path / "noise", features=features,
                          clip_scorer=_mean_brightness, reference_dir=out / "reference-256", progress=False)
    assert noise["FID"] > 1.0 and noise["FID"] > 1000 * max(result["FID"], 1e-6)


def test_coco2014_protocol_draws_captions_uses_every_reference_image_and_extends_a_partial_run(stand_ins, features,
                                                                                                tmp_path):
    ann14, dir14 = stand_ins[0]
    generate, out = Calls(_noise), tmp_path / "run"
    run = dict(features=features, clip_scorer=_mean_brightness, batch_size=8, progress=False)
    first = coco_protocol(generate, ann14, dir14, "coco2014-30k", out, n=20, **run)
    drawn = [c.caption for c in coco2014_30k(ann14, n=SET_SIZE)]  # the whole (stand-in sized) seeded draw
    assert first["images"] == 20 and (out / "prompts.txt").read_text().splitlines() == drawn[:20]
    manifest = json.loads(first["manifest"].read_text())
    assert manifest["reference_size"] == SET_SIZE and manifest["images"] == 20  # every val2014 image, as SBv2

    second = coco_protocol(generate, ann14, dir14, "coco2014-30k", out, n=30, **run)
    assert generate.indices == list(range(30))  # only the 10 new images were generated
    assert second["images"] == 30 and len(list((out / "generated-256").iterdir())) == 30
    with pytest.raises(ValueError, match="use a fresh out_dir"):
        coco_protocol(generate, ann14, dir14, "coco2014-30k", out, n=10, **run)

    caption_list = tmp_path / "captions.txt"
    caption_list.write_text("".join(c + "\n" for c in drawn[::-1]))
    listed = Calls(_noise)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 5 images for 16-d features
        coco_protocol(listed, caption_list, dir14, "coco2014-30k", tmp_path / "listed", n=5, **run)
    assert (tmp_path / "listed" / "prompts.txt").read_text().splitlines() == drawn[::-1][:5]
    assert listed.indices == list(range(5))


@pytest.mark.parametrize("kwargs, message", [
    (dict(protocol="coco2015"), "unknown COCO protocol 'coco2015'"),
    (dict(n=SET_SIZE + 1), "asked for n=41 images"),
    (dict(n=1), "FID needs at least 2 images"),
])
def test_bad_protocol_arguments_raise_before_generating(stand_ins, features, tmp_path, kwargs, message):
    ann17, dir17 = stand_ins[1]
    generate = Calls(_noise)
    arguments = dict(protocol="coco2017-5k") | kwargs
    with pytest.raises(ValueError, match=message):
        coco_protocol(generate, ann17, dir17, out_dir=tmp_path / "out", features=features,
                      clip_scorer=_mean_brightness, progress=False, **arguments)
    assert generate.indices == []


def test_missing_inception_weights_raise_before_generating(stand_ins, tmp_path, monkeypatch):
    ann17, dir17 = stand_ins[1]
    monkeypatch.setattr(protocols, "CLEANFID_INCEPTION_DIR", tmp_path / "empty-cleanfid-cache")
    (tmp_path / "empty-cleanfid-cache").mkdir()
    generate = Calls(_noise)

    def run():
        coco_protocol(generate, ann17, dir17, "coco2017-5k", tmp_path / "out", features=None,
                      clip_scorer=_mean_brightness, progress=False)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Inception weights are not cached .* HF_HUB_OFFLINE=1 forbids .*features="):
        run()

    def unreachable(fpath):
        raise OSError("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(protocols, "check_download_inception", unreachable)
    with pytest.raises(RuntimeError, match="downloading them failed \\(network unreachable\\): run once with network"):
        run()

    (tmp_path / "empty-cleanfid-cache" / protocols.CLEANFID_INCEPTION_FILE).write_bytes(b"half a download")
    with pytest.raises(RuntimeError, match="are damaged"):
        run()
    assert generate.indices == [] and not (tmp_path / "out" / "generated").exists()


def test_missing_open_clip_raises_before_generating(stand_ins, features, tmp_path, monkeypatch):
    ann17, dir17 = stand_ins[1]
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    generate = Calls(_noise)
    with pytest.raises(RuntimeError, match="pip install open_clip_torch.*clip_scorer="):
        coco_protocol(generate, ann17, dir17, "coco2017-5k", tmp_path / "out", features=features, clip_scorer=None,
                      progress=False)
    assert generate.indices == []


def test_one_step_generator_images_do_not_depend_on_the_batch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone("smoke-sd15", device="cpu")
    generate = one_step_generator(backbone.denoiser, backbone, seed=3)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    together = generate(prompts, [0, 1, 2])
    alone = generate(prompts[1:2], [1])
    assert together.shape == (3, 3, backbone.resolution, backbone.resolution)
    assert 0 <= together.min() and together.max() <= 1
    torch.testing.assert_close(alone[0], together[1])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(one_step_generator(backbone.denoiser, backbone, seed=4)(prompts[1:2], [1]), alone)
