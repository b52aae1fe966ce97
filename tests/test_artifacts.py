"""Cached artifacts: hashes name configs, atomic writes, loud failures on corrupt or mismatched files."""

import time

import pytest
import torch

from wadi_core import artifacts
from wadi_core.profiles import TeacherTrainConfig, get_profile


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WADI_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("WADI_FRESH", raising=False)
    monkeypatch.delenv("WADI_NO_TRAIN", raising=False)
    return tmp_path


def test_hash_depends_on_every_field_and_nesting():
    base = TeacherTrainConfig()
    assert artifacts.config_hash(base) == artifacts.config_hash(TeacherTrainConfig())
    assert artifacts.config_hash(base) != artifacts.config_hash(TeacherTrainConfig(steps=base.steps + 1))
    nested = {"teacher": base, "profile": get_profile("tiny").world}
    assert artifacts.config_hash(nested) == artifacts.config_hash(dict(reversed(list(nested.items()))))


def test_round_trip_and_cache_lookup(data_dir):
    config = {"a": 1}
    path = artifacts.artifact_path("thing", config)
    assert artifacts.cached("thing", config) is None
    artifacts.save_checkpoint(path, {"w": torch.arange(4.0)}, config, note="x")
    assert artifacts.cached("thing", config) == path
    tensors, meta = artifacts.load_checkpoint(path, config)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta["note"] == "x"


def test_mismatched_config_and_corrupt_file_raise_with_a_fix(data_dir):
    path = artifacts.artifact_path("thing", {"a": 1})
    artifacts.save_checkpoint(path, {"w": torch.zeros(2)}, {"a": 1})
    with pytest.raises(artifacts.ArtifactError, match="FRESH=1 make reproduce"):
        artifacts.load_checkpoint(path, {"a": 2})
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(artifacts.ArtifactError, match="not a readable safetensors"):
        artifacts.load_checkpoint(path, {"a": 1})
    with pytest.raises(artifacts.ArtifactError, match="missing artifact"):
        artifacts.load_checkpoint(data_dir / "absent.safetensors", {"a": 1})


def test_failed_write_leaves_nothing_behind(data_dir):
    target = data_dir / "out.txt"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(data_dir.iterdir()) == []


def test_no_train_switch_forbids_training(data_dir, monkeypatch):
    monkeypatch.setenv("WADI_NO_TRAIN", "1")
    with pytest.raises(artifacts.ArtifactError, match="WADI_NO_TRAIN"):
        artifacts.training_allowed("teacher_unet", data_dir / "teacher.safetensors")


def test_profiles_are_known_and_paper_needs_a_gpu():
    assert get_profile("smoke").teacher.steps < get_profile("tiny").teacher.steps
    with pytest.raises(ValueError, match="smoke, tiny, paper"):
        get_profile("huge")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a GPU and model-hub access"):
            get_profile("paper")


def test_fresh_run_retrains_once_then_reuses(data_dir, monkeypatch):
    config = {"b": 1}
    path = artifacts.artifact_path("thing", config)
    artifacts.save_checkpoint(path, {"w": torch.zeros(1)}, config)
    artifacts._WRITTEN_THIS_PROCESS.discard(path.resolve())  # as if left by an earlier run
    monkeypatch.setenv("WADI_FRESH", "1")
    assert artifacts.cached("thing", config) is None
    artifacts.save_checkpoint(path, {"w": torch.ones(1)}, config)  # retrained by this run
    assert artifacts.cached("thing", config) == path


def test_fresh_run_reuses_what_another_process_of_the_run_wrote(data_dir, monkeypatch):
    config = {"c": 1}
    path = artifacts.artifact_path("thing", config)
    monkeypatch.setenv("WADI_FRESH", "1")
    monkeypatch.setenv("WADI_FRESH_SINCE", repr(time.time() - 60))  # the run started a minute ago
    artifacts.save_checkpoint(path, {"w": torch.zeros(1)}, config)
    artifacts._WRITTEN_THIS_PROCESS.discard(path.resolve())  # as if an earlier notebook's kernel wrote it
    assert artifacts.cached("thing", config) == path
    monkeypatch.setenv("WADI_FRESH_SINCE", repr(time.time() + 60))  # a run that started after the file
    assert artifacts.cached("thing", config) is None
