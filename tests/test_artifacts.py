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


def test_fields_except_drops_named_fields_and_rejects_unknown_ones():
    config = TeacherTrainConfig()
    kept = artifacts.fields_except(config, ("steps", "seed"))
    assert "steps" not in kept and "seed" not in kept and kept["lr"] == config.lr
    assert artifacts.config_hash(kept) == artifacts.config_hash(
        artifacts.fields_except(TeacherTrainConfig(steps=config.steps + 1), ("steps", "seed")))
    with pytest.raises(ValueError, match="no field"):
        artifacts.fields_except(config, ("not_a_field",))


def test_round_trip_and_cache_lookup(data_dir):
    config = {"a": 1}
    path = artifacts.artifact_path("thing", config)
    assert artifacts.cached("thing", config) is None
    artifacts.save_checkpoint(path, {"w": torch.arange(4.0)}, config, note="x")
    assert artifacts.cached("thing", config) == path
    tensors, meta = artifacts.load_checkpoint(path, config)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta["note"] == "x"


def test_mismatched_config_and_corrupt_file_raise_with_a_fix(data_dir):
    path = artifacts.artifact_path("teacher_unet", {"a": 1})
    artifacts.save_checkpoint(path, {"w": torch.zeros(2)}, {"a": 1})
    with pytest.raises(artifacts.ArtifactError, match="FRESH=1 make reproduce"):
        artifacts.load_checkpoint(path, {"a": 2})
    (data_dir / artifacts.CHECKSUMS).unlink()  # a corrupt file that SHA256SUMS does not list
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
    with pytest.raises(ValueError, match="smoke, tiny, paper-smoke, paper"):
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


def test_fresh_run_counts_a_missing_folder_as_not_yet_written(data_dir, monkeypatch):
    monkeypatch.setenv("WADI_FRESH", "1")
    monkeypatch.setenv("WADI_FRESH_SINCE", repr(time.time() - 60))
    assert artifacts.outdated_by_fresh(data_dir / "tiny_sd-smoke")  # never built: build it, do not stat it


def _linear_trainer(calls: list):
    """build / train callables of :func:`artifacts.load_or_train` for a 3→2 Linear; ``calls`` counts trainings."""

    def build(metadata):
        return torch.nn.Linear(3, int(metadata["out_features"]))

    def train():
        calls.append(1)
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2), {"step": [0.0, 1.0], "loss": [2.0, 1.0]}, {"out_features": "2"}

    return build, train


def test_load_or_train_trains_once_then_loads_the_same_weights(data_dir, monkeypatch):
    calls = []
    build, train = _linear_trainer(calls)
    first = artifacts.load_or_train("thing", {"d": 1}, build, train, config="recipe", label="a linear")
    assert first.trained and first.path == artifacts.artifact_path("thing", {"d": 1}) and calls == [1]
    assert first.status() == f"a linear: trained now and saved as {first.path.name}"
    assert first.config == "recipe" and first.metadata["out_features"] == "2" and not first.model.training
    monkeypatch.setenv("WADI_NO_TRAIN", "1")
    again = artifacts.load_or_train("thing", {"d": 1}, build, train)
    assert not again.trained and calls == [1] and again.config == {"d": 1}
    assert again.status() == f"Linear: loaded from the cache {first.path.name}"
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert list(again.log.columns) == ["step", "loss"] and again.log["step"].tolist() == [0, 1]
    assert again.log.equals(first.log)
    with pytest.raises(artifacts.ArtifactError, match="a linear is not cached.*WADI_NO_TRAIN"):
        artifacts.load_or_train("thing", {"d": 2}, build, train, label="a linear")


def test_load_or_train_stores_only_trainable_parameters_when_asked(data_dir):
    def build(_):
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        model[0].requires_grad_(False)
        return model

    def train():
        model = build({})
        with torch.no_grad():
            model[1].weight.fill_(3.0)
        return model, {"step": [1]}, {}

    trained = artifacts.load_or_train("adapter", {"e": 1}, build, train, trainable_only=True)
    tensors, _ = artifacts.load_checkpoint(trained.path, {"e": 1})
    assert set(tensors) == {"1.weight", "1.bias", "log.step"}
    assert trained.trainable_parameters == 6
    loaded = artifacts.load_or_train("adapter", {"e": 1}, build, train, trainable_only=True)
    assert not loaded.trained and torch.equal(loaded.model[1].weight, torch.full((2, 2), 3.0))
    with pytest.raises(artifacts.ArtifactError, match="stored parameters do not match"):
        artifacts.load_or_train("adapter", {"e": 1}, lambda _: torch.nn.Linear(2, 3), train, trainable_only=True)


def test_rebuild_hints_name_the_notebook_that_builds_each_kind(data_dir):
    for kind, notebook in (("tiny_clip", "00"), ("teacher_unet", "00"), ("feature_net", "00"), ("student", "03")):
        path = artifacts.artifact_path(kind, {"a": 1})
        path.write_bytes(b"garbage")
        with pytest.raises(artifacts.ArtifactError, match=f"ONLY={notebook}"):
            artifacts.load_checkpoint(path, {"a": 1})
    with pytest.raises(artifacts.ArtifactError, match="`make reproduce`"):
        artifacts.load_checkpoint(artifacts.artifact_path("samples", {"a": 1}), {"a": 1})


def test_saving_records_the_checksum_and_a_damaged_file_is_refused(data_dir):
    path = artifacts.artifact_path("student", {"f": 1})
    artifacts.save_checkpoint(path, {"w": torch.arange(8.0)}, {"f": 1})
    other = artifacts.artifact_path("thing", {"f": 2})
    artifacts.save_checkpoint(other, {"w": torch.zeros(1)}, {"f": 2})
    sums = artifacts.read_checksums(data_dir)
    assert sums == {path.name: artifacts.file_sha256(path), other.name: artifacts.file_sha256(other)}
    lines = (data_dir / artifacts.CHECKSUMS).read_text().splitlines()
    assert lines == sorted(lines, key=lambda line: line.split()[1]) and all("  " in line for line in lines)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1  # one bit of the tensor data: the file still parses
    path.write_bytes(bytes(damaged))
    with pytest.raises(artifacts.ArtifactError, match="download is damaged.*ONLY=03"):
        artifacts.load_checkpoint(path, {"f": 1})
    (data_dir / artifacts.CHECKSUMS).write_text(f"{sums[other.name]}  {other.name}\n")  # unlisted files pass
    assert torch.equal(artifacts.load_checkpoint(path, {"f": 1})[0]["w"][:-1], torch.arange(7.0))


def test_a_checksum_is_computed_once_per_file_and_version(data_dir, monkeypatch):
    path = artifacts.artifact_path("thing", {"g": 1})
    artifacts.save_checkpoint(path, {"w": torch.zeros(1)}, {"g": 1})
    artifacts._VERIFIED.clear()
    hashed = []
    real = artifacts.file_sha256
    monkeypatch.setattr(artifacts, "file_sha256", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        artifacts.load_checkpoint(path, {"g": 1})
    assert hashed == [path]


def test_the_bundled_artifacts_match_the_repositorys_sha256sums():
    data = artifacts.REPO_ROOT / "data"
    listed = artifacts.read_checksums(data)
    present = {str(p.relative_to(data)) for p in data.rglob("*")
               if p.is_file() and p.name != artifacts.CHECKSUMS and not p.name.startswith(".")}
    assert present == set(listed), "data/SHA256SUMS must list exactly the files in data/"
    for name, digest in listed.items():
        assert artifacts.file_sha256(data / name) == digest, f"{name} does not match data/SHA256SUMS"
