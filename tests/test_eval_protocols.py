"""Evaluation protocols: FID reference-stat caching, precision/recall, paper CLIP, COCO loaders, generation."""

import json
import sys

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from PIL import Image

from wadi_core.eval import (
    PaperClipScorer,
    ShapesFeatureNet,
    center_crop_resize,
    center_crop_resize_folder,
    clip_score_paper,
    coco2014_30k,
    coco2014_30k_captions,
    coco2017_5k,
    feature_extractor,
    fid,
    file_sha256,
    folder_features,
    generate_to_folder,
    paper_clip_scorer,
    per_image_noise,
    precision_recall,
    reference_stats,
    save_images,
    write_eval_manifest,
)
from wadi_core.eval.coco import COCO14_CAPTIONS_ENV, coco2014_caption_list_path
from wadi_core.eval.fid import _keep_native_resolution

# SHA-256 of DMD2's public caption list (tianweiy/DMD2, main/coco_eval/captions_coco14_test.txt).
DMD2_CAPTIONS_SHA256 = "edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ShapesFeatureNet(channels=(8, 8, 8), feature_dim=8).eval()  # 16-d features


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    generator = torch.Generator().manual_seed(0)
    save_images(torch.rand(40, 3, 32, 32, generator=generator), root / "gen")
    save_images(torch.rand(40, 3, 32, 32, generator=generator) ** 2, root / "ref")
    return root / "gen", root / "ref"


def _direct(gen, ref, net):
    return cleanfid.compute_fid(
        str(gen), str(ref), mode="clean", custom_feat_extractor=feature_extractor(net),
        custom_fn_resize=_keep_native_resolution, device=torch.device("cpu"), num_workers=0, verbose=False,
    )


# --- FID ---------------------------------------------------------------------------------------------------


def test_fid_equals_direct_clean_fid_cached_or_not(folders, net):
    direct = _direct(*folders, net)
    assert direct > 0
    for cache in (True, True, False):  # miss, hit, uncached
        assert fid(*folders, features=net, cache=cache) == pytest.approx(direct, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero(folders, net):
    assert fid(folders[1], folders[1], features=net) == pytest.approx(0.0, abs=1e-3)


def test_reference_stats_are_cached_by_contents_and_extractor(tmp_path, folders, net):
    first = reference_stats(folders[1], features=net, name="ref")
    assert not first.cached and first.path.exists() and first.count == 40
    assert first.path.parent == tmp_path / "cache" / "fid_stats" and first.path.name.startswith("ref-clean-")
    again = reference_stats(folders[1], features=net, name="ref")
    assert again.cached and again.path == first.path
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    feats = folder_features(folders[1], features=net)
    assert feats.shape == (40, 16)
    np.testing.assert_allclose(first.sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-9)
    other = ShapesFeatureNet(channels=(8, 8, 8), feature_dim=8).eval()  # other weights → other file
    assert reference_stats(folders[1], features=other, name="ref").path != first.path


def test_reference_cache_follows_folder_contents(tmp_path, folders, net):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(folders[1], ref)
    before = fid(folders[0], ref, features=net)
    save_images(torch.zeros(1, 3, 32, 32), ref, start_index=40)  # one more image: a new manifest
    after = fid(folders[0], ref, features=net)
    assert after == pytest.approx(_direct(folders[0], ref, net), rel=1e-6) and after != before
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.npz"))) == 2


def test_fid_errors_name_the_problem(tmp_path, folders, net):
    with pytest.raises(FileNotFoundError, match="missing.*does not exist.*reference_folder"):
        fid(folders[0], tmp_path / "missing", features=net)
    save_images(torch.rand(1, 3, 32, 32), tmp_path / "one")
    with pytest.raises(ValueError, match="at least 2 images.*has 1"):
        fid(tmp_path / "one", folders[1], features=net)
    with pytest.raises(ValueError, match="unknown clean-fid mode 'fast'"):
        fid(*folders, features=net, mode="fast")
    save_images(torch.rand(10, 3, 32, 32), tmp_path / "ten")
    with pytest.warns(UserWarning, match="10 images for 16-d features"):
        fid(tmp_path / "ten", folders[1], features=net)


# --- precision / recall -----------------------------------------------------------------------------------------


def test_precision_recall_extremes_and_chunking():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 8, generator=generator)
    assert precision_recall(a, a.clone(), k=3, chunk=7) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(a.numpy(), a.numpy() + 100.0) == {"precision": 0.0, "recall": 0.0}
    b = torch.randn(60, 8, generator=generator) * 1.5
    small, large = precision_recall(a, b, chunk=8), precision_recall(a, b, chunk=1000)
    assert small == pytest.approx(large) and 0 < small["precision"] < 1
    with pytest.raises(ValueError, match="k=60 for 60"):
        precision_recall(a, b, k=60)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(a, b[:, :4])


# --- paper CLIP --------------------------------------------------------------------------------------------------


class _FakeOpenClip(torch.nn.Module):
    """open_clip's interface (encode_image / encode_text) on toy encoders; records the prompts it saw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(3 * 8 * 8, 6)
        self.text = torch.nn.Embedding(256, 6)

    def encode_image(self, pixels):
        return self.image(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def _fake_scorer(seen):
    def tokenizer(texts):
        seen.extend(texts)
        return torch.tensor([[ord(c) % 256 for c in t.ljust(40)[:40]] for t in texts])

    def preprocess(image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255

    return PaperClipScorer(_FakeOpenClip().eval(), preprocess, tokenizer, torch.device("cpu"))


def test_clip_score_paper_prefix_and_batch_invariance():
    seen = []
    scorer = _fake_scorer(seen)
    images = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = [f"a dog number {i}" for i in range(7)]
    a = clip_score_paper(images, prompts, scorer, batch_size=7)
    b = clip_score_paper(list(images), prompts, scorer, batch_size=3)
    assert a == pytest.approx(b, abs=1e-6) and -1 <= a <= 1
    assert seen[0] == "A photo depicts a dog number 0"
    with pytest.raises(ValueError, match="7 images but 6 prompts"):
        clip_score_paper(images, prompts[:6], scorer)


def test_paper_clip_scorer_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip → ImportError
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        paper_clip_scorer()


# --- COCO ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def annotations(tmp_path):
    images = [{"id": i, "file_name": f"COCO_val_{i:012d}.jpg"} for i in (5, 3, 9, 1, 7)]
    captions = [(11, 3, "a cat "), (10, 3, "a  cat\non a mat"), (12, 5, "a dog"), (20, 9, "a bird"),
                (19, 9, "two birds"), (21, 1, "a car"), (30, 7, "a boat"), (31, 7, "a ship")]
    data = {"images": images, "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions]}
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(data))
    return path


def test_coco2017_5k_takes_the_first_caption_of_each_image(annotations):
    rows = coco2017_5k(annotations)
    assert [r.image_id for r in rows] == [1, 3, 5, 7, 9]
    assert [r.caption for r in rows] == ["a car", "a cat on a mat", "a dog", "a boat", "two birds"]
    assert rows[0].file_name == "COCO_val_000000000001.jpg"


def test_coco2014_sampling_is_seeded(annotations):
    a = coco2014_30k(annotations, seed=2024, n=3)
    assert a == coco2014_30k(annotations, seed=2024, n=3) and len({r.image_id for r in a}) == 3
    assert [r.image_id for r in a] == sorted(r.image_id for r in a)
    assert coco2014_30k_captions(annotations=annotations, n=3) == [r.caption for r in a]
    draws = {tuple(r.caption for r in coco2014_30k(annotations, seed=s, n=5)) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ValueError, match="asked for 6 captions"):
        coco2014_30k(annotations, n=6)
    with pytest.raises(ValueError, match="exactly one of"):
        coco2014_30k_captions()
    with pytest.raises(FileNotFoundError, match="cocodataset.org"):
        coco2014_30k(annotations.parent / "nope.json")


def test_caption_list_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a cat\na dog \na bird\n")
    assert coco2014_30k_captions(path, n=2) == ["a cat", "a dog"]
    assert coco2014_30k_captions(path, n=None) == ["a cat", "a dog", "a bird"]
    with pytest.raises(ValueError, match="asked for 30000 captions"):
        coco2014_30k_captions(path)


def test_caption_list_path_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(COCO14_CAPTIONS_ENV, raising=False)
    assert coco2014_caption_list_path() is None
    monkeypatch.setenv(COCO14_CAPTIONS_ENV, "")
    assert coco2014_caption_list_path() is None
    path = tmp_path / "captions.txt"
    path.write_text("a cat\n")
    monkeypatch.setenv(COCO14_CAPTIONS_ENV, str(path))
    assert coco2014_caption_list_path() == path
    monkeypatch.setenv(COCO14_CAPTIONS_ENV, str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=COCO14_CAPTIONS_ENV):
        coco2014_caption_list_path()


def test_real_coco2014_30k_caption_list():
    path = coco2014_caption_list_path()
    if path is None:
        pytest.skip(f"set {COCO14_CAPTIONS_ENV} to DMD2's COCO-2014 30k caption list (captions_coco14_test.txt, "
                    "one caption per line) to check it")
    assert file_sha256(path) == DMD2_CAPTIONS_SHA256, f"{path} is not DMD2's captions_coco14_test.txt"
    captions = coco2014_30k_captions(path)
    assert len(captions) == 30_000 and captions == coco2014_30k_captions(path)
    assert captions[0] == "This wire metal rack holds several pairs of shoes and sandals"
    assert all(c and "\n" not in c for c in captions)


def test_center_crop_resize_keeps_a_centred_square():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)  # (H, W): 10-px side bands around a 40×40 centre
    image[:, 10:50] = rng.integers(0, 256, (40, 40, 3))
    assert np.array_equal(center_crop_resize(image, size=40), image[:, 10:50])
    out = center_crop_resize(Image.fromarray(image))
    assert isinstance(out, Image.Image) and out.size == (256, 256)
    tall = center_crop_resize(np.zeros((90, 30, 3), np.uint8), size=16)
    assert tall.shape == (16, 16, 3)


def test_center_crop_resize_folder(tmp_path):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "src" / "a.jpg")
    out = center_crop_resize_folder(tmp_path / "src", tmp_path / "dst", size=16, progress=False)
    assert [p.name for p in out.iterdir()] == ["a.png"]
    assert Image.open(out / "a.png").size == (16, 16)


def test_write_eval_manifest(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na dog\n")
    manifest = write_eval_manifest(tmp_path / "eval" / "manifest.json", caption_file=captions, seed=2024,
                                   resolution=256, reference_size=40_504, safety_checker=False)
    stored = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert stored == manifest
    import hashlib

    assert stored["caption_file_sha256"] == hashlib.sha256(b"a cat\na dog\n").hexdigest()
    assert (stored["seed"], stored["resolution"], stored["reference_size"], stored["caption_count"]) == (
        2024, 256, 40_504, 2)
    assert stored["safety_checker"] is False and "clean_fid_version" in stored


# --- generation ----------------------------------------------------------------------------------------------------


def test_generate_to_folder_resumes_and_is_batching_independent(tmp_path):
    calls = []

    def generate(prompts, indices):
        calls.append(list(indices))
        return per_image_noise(indices, (3, 4, 4), seed=7).sigmoid()

    prompts = [f"p{i}" for i in range(7)]
    paths = generate_to_folder(generate, prompts, tmp_path / "s", batch_size=3, progress=False)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]] and [p.name for p in paths] == [f"{i:06d}.png" for i in range(7)]
    first = {p.name: np.asarray(Image.open(p)) for p in paths}
    calls.clear()
    generate_to_folder(generate, prompts, tmp_path / "s", batch_size=3, progress=False)
    assert calls == []  # complete: nothing to do
    for i in (1, 5, 6):
        paths[i].unlink()
    generate_to_folder(generate, prompts, tmp_path / "s", batch_size=2, progress=False)
    assert calls == [[1, 5], [6]]
    assert all(np.array_equal(np.asarray(Image.open(p)), first[p.name]) for p in paths)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        generate_to_folder(lambda p, i: torch.rand(len(i), 4, 4), prompts, tmp_path / "t", progress=False)
