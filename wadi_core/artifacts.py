"""Cached artifacts: config hashing, atomic writes, safetensors checkpoints that know their config.

Every expensive artifact (tiny CLIP, teacher, feature net, students, teacher samples) is stored under the data
directory as ``<kind>-<hash>.safetensors`` where ``hash`` is the SHA-256 (first 12 hex digits) of the canonical
JSON of the config that produced it. The config JSON travels inside the safetensors metadata, so a renamed or
edited file is detected on load. Nothing in ``data/`` is ever unpickled. :func:`load_or_train` is the one
cache-or-train path behind every ``load_or_train_*``.

``SHA256SUMS`` (``sha256sum`` format) beside the artifacts lists the SHA-256 of each file: a listed file whose
bytes differ (a damaged download) is refused before it is loaded, and :func:`save_checkpoint` records every file
it writes in the ``SHA256SUMS`` of the directory it writes to. A folder built from artifacts (the latent tiny SD
pipeline) is listed file by file as ``<folder>/<relative path>`` (:func:`record_folder_checksums`).

Environment switches (set by ``make``/``python -m wadi_core.reproduce``):

- ``WADI_DATA_DIR``: where artifacts are read and written (default: the repository's ``data/``);
- ``WADI_FRESH=1``: ignore cached artifacts and retrain (``FRESH=1 make reproduce``); with
  ``WADI_FRESH_SINCE=<unix time>`` (set once per ``reproduce --fresh`` run) an artifact written after that time
  counts as retrained by this run, so later notebooks of the same run reuse it instead of retraining it again;
- ``WADI_RESULTS_DIR``: where figures, tables and the manifest go (default: the repository's ``results/``);
- ``WADI_NO_TRAIN=1``: a missing artifact raises instead of being trained (nbval in ``make test``, so CI
  never retrains silently).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKSUMS = "SHA256SUMS"  # ``sha256sum`` listing of the artifacts, one per data directory
# The notebook that trains each kind of artifact (what a rebuild hint names).
BUILT_BY = {"tiny_clip": "00", "teacher_unet": "00", "feature_net": "00", "tiny_vae": "00", "latent_teacher": "00",
            "student": "03"}
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_WRITTEN_THIS_PROCESS: set[Path] = set()  # with WADI_FRESH=1, artifacts retrained by this run are reused
_VERIFIED: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) whose bytes were checked against SHA256SUMS


class ArtifactError(RuntimeError):
    """A cached artifact is missing, corrupt, or was produced by another config."""


def data_dir() -> Path:
    return Path(os.environ.get("WADI_DATA_DIR", REPO_ROOT / "data"))


def results_dir() -> Path:
    return Path(os.environ.get("WADI_RESULTS_DIR", REPO_ROOT / "results"))


def cache_dir() -> Path:
    """Scratch space for regenerable files (image folders for clean-fid): ``WADI_CACHE_DIR``, else a
    ``.cache`` folder beside the data directory (git-ignored); never committed."""
    return Path(os.environ.get("WADI_CACHE_DIR", data_dir().parent / ".cache"))


def fresh_requested() -> bool:
    """True when ``WADI_FRESH=1``: caches are ignored and everything is retrained."""
    return os.environ.get("WADI_FRESH", "0") not in ("", "0", "false", "False")


def canonical_json(config: Any) -> str:
    """Canonical JSON of dataclasses, dicts and lists nested in any order: sorted keys, tuples as lists."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=_dataclass_as_dict)


def _dataclass_as_dict(value: Any) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot hash a {type(value).__name__} into an artifact config")


def fields_except(config: Any, excluded: Sequence[str]) -> dict:
    """A dataclass ``config`` as a dict without the ``excluded`` fields: the key of an artifact that settings such
    as evaluation sizes must not retrain."""
    unknown = set(excluded) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field(s) {sorted(unknown)}")
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in excluded}


def config_hash(config: Any) -> str:
    """First 12 hex digits of the SHA-256 of :func:`canonical_json`; names the artifact."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 (first 16 hex digits) of a prompt list's JSON, in order: keys an artifact or record on its prompts."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's bytes: keys an artifact on the exact inputs it was made from."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers (names, shapes, values): keys an
    artifact on the exact weights it was derived from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_path(kind: str, config: Any, suffix: str = ".safetensors") -> Path:
    return data_dir() / f"{kind}-{config_hash(config)}{suffix}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; only if the block succeeds, it replaces ``folder``.

    An earlier ``folder`` is first renamed aside, then the new one renamed into place: an interruption leaves the
    old folder, no folder, or the new one, never a half-written one. The folder counts as written by this run
    (:func:`outdated_by_fresh`).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-", suffix=".tmp"))
    old = None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-", suffix=".old"))
            os.replace(folder, old)  # onto an empty folder: allowed
        os.rename(staging, folder)
        _WRITTEN_THIS_PROCESS.add(folder.resolve())
    finally:
        for leftover in (staging, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


# --------------------------------------------------------------------------------------------------------------
# SHA256SUMS
# --------------------------------------------------------------------------------------------------------------


def read_checksums(folder: Path) -> dict[str, str]:
    """``{file name: SHA-256}`` from ``folder/SHA256SUMS`` (``sha256sum`` format); ``{}`` when there is none."""
    listing = Path(folder) / CHECKSUMS
    if not listing.exists():
        return {}
    sums = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.removeprefix("*")] = digest  # "*" marks binary mode in sha256sum's output
    return sums


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself, so that processes writing artifacts there update SHA256SUMS in turn."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _update_checksums(folder: Path, digests: dict[str, str], replace_prefix: str | None = None) -> None:
    """Merge ``{name: SHA-256}`` into ``folder/SHA256SUMS`` (dropping the entries under ``replace_prefix`` first),
    atomically and under the folder's lock."""
    with _locked(folder):
        sums = {name: digest for name, digest in read_checksums(folder).items()
                if replace_prefix is None or not name.startswith(replace_prefix)}
        sums.update(digests)
        atomic_write_text(folder / CHECKSUMS, "".join(f"{sums[name]}  {name}\n" for name in sorted(sums)))


def record_checksum(path: Path) -> None:
    """Write ``path``'s SHA-256 into the SHA256SUMS of its directory (created if needed), atomically."""
    path = Path(path)
    _update_checksums(path.parent, {path.name: file_sha256(path)})
    _VERIFIED[path.resolve()] = _stamp(path)


def _folder_files(folder: Path) -> dict[str, Path]:
    """``{"<folder name>/<relative path>": file}`` of every file under ``folder`` (hidden ones left out)."""
    return {f"{folder.name}/{path.relative_to(folder).as_posix()}": path for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(".")}


def record_folder_checksums(folder: Path) -> None:
    """List every file under ``folder`` in the SHA256SUMS of its parent as ``<folder name>/<relative path>`` (as
    ``sha256sum`` run in the parent prints them), replacing the folder's earlier entries."""
    folder = Path(folder)
    digests = {name: file_sha256(path) for name, path in _folder_files(folder).items()}
    _update_checksums(folder.parent, digests, replace_prefix=f"{folder.name}/")


def folder_matches_checksums(folder: Path) -> bool:
    """True when the SHA256SUMS of ``folder``'s parent lists exactly the files under ``folder``, with their bytes
    (what :func:`record_folder_checksums` wrote)."""
    folder = Path(folder)
    prefix = f"{folder.name}/"
    listed = {name: digest for name, digest in read_checksums(folder.parent).items() if name.startswith(prefix)}
    files = _folder_files(folder)
    return bool(listed) and set(listed) == set(files) and all(file_sha256(files[n]) == d for n, d in listed.items())


def verify_checksum(path: Path) -> None:
    """Raise :class:`ArtifactError` when ``path`` is listed in its directory's SHA256SUMS with other bytes.

    Files that are not listed pass. Each file is hashed once per process (again only if it changes on disk).
    """
    path = Path(path)
    stamp = _stamp(path)
    if _VERIFIED.get(path.resolve()) == stamp:
        return
    expected = read_checksums(path.parent).get(path.name)
    if expected is not None and file_sha256(path) != expected:
        raise ArtifactError(
            f"{path} does not match its SHA-256 in {path.parent / CHECKSUMS}: the download is damaged. Restore it "
            f"(`git checkout -- {path.name}` in its directory, or clone again), or {_rerun_hint(path)}"
        )
    _VERIFIED[path.resolve()] = stamp


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: Any, **metadata: str) -> None:
    """Atomically write ``tensors`` as safetensors, with the producing config and its hash as metadata, and
    record the file in the directory's SHA256SUMS."""
    meta = {"config": canonical_json(config), "config_hash": config_hash(config), **metadata}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    record_checksum(path)
    _WRITTEN_THIS_PROCESS.add(Path(path).resolve())


def _rerun_hint(path: Path) -> str:
    """How to rebuild the artifact at ``path``: the notebook that trains its kind (:data:`BUILT_BY`)."""
    name = Path(path).name
    notebook = BUILT_BY.get(name.rpartition("-")[0])
    if notebook is None:
        return f"re-create it with `make reproduce`, which derives missing caches (delete a damaged one) [{name}]"
    return (f"rebuild it with `FRESH=1 make reproduce ONLY={notebook}` "
            f"(or `python -m wadi_core.reproduce --fresh --only {notebook}`) [{name}]")


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err}); {_rerun_hint(path)}") from err


def load_checkpoint(path: Path, config: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint written by :func:`save_checkpoint`, checking its SHA256SUMS entry and that ``config``
    produced it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}; {_rerun_hint(path)}")
    verify_checksum(path)
    meta = read_metadata(path)
    expected = config_hash(config)
    if meta.get("config_hash") != expected or config_hash(json.loads(meta.get("config", "null"))) != expected:
        raise ArtifactError(
            f"{path} was produced by config hash {meta.get('config_hash')!r}, but the current config hashes to "
            f"{expected!r}; {_rerun_hint(path)}"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} failed to load ({err}); {_rerun_hint(path)}") from err
    return tensors, meta


def _written_this_run(path: Path) -> bool:
    """Written by this process, or (``WADI_FRESH_SINCE`` set) by any process of this run since that time."""
    if path.resolve() in _WRITTEN_THIS_PROCESS:
        return True
    since = os.environ.get("WADI_FRESH_SINCE")
    return bool(since) and path.exists() and path.stat().st_mtime >= float(since)


def outdated_by_fresh(path: Path) -> bool:
    """True under ``WADI_FRESH=1`` for a file or folder this run has not written yet (a fresh run derives each
    artifact once, then reuses what it wrote)."""
    return fresh_requested() and not _written_this_run(Path(path))


def cached(kind: str, config: Any, suffix: str = ".safetensors") -> Path | None:
    """Path of a usable cached artifact, or None when it is absent or :func:`outdated_by_fresh`."""
    path = artifact_path(kind, config, suffix)
    if not path.exists() or outdated_by_fresh(path):
        return None
    return path


def training_allowed(kind: str, path: Path) -> None:
    """Raise when ``WADI_NO_TRAIN=1`` forbids training the missing artifact ``kind`` at ``path``."""
    if os.environ.get("WADI_NO_TRAIN", "0") not in ("", "0", "false", "False"):
        raise ArtifactError(f"{kind} is not cached at {path} and WADI_NO_TRAIN=1 forbids training it; "
                            + _rerun_hint(path))


def load_or_compute_record(kind: str, key: Any, compute: Callable[[], dict], label: str = "") -> dict:
    """A small JSON result (e.g. the scores of a student that is not bundled) cached as
    ``<data dir>/<kind>-<config_hash(key)>.json``: read when cached, else computed, written atomically and recorded
    in SHA256SUMS. ``WADI_FRESH`` and ``WADI_NO_TRAIN`` act on it as on a trained model.

    Raises:
        ArtifactError: not cached while ``WADI_NO_TRAIN=1``, or the file is damaged or from another key.
    """
    path = cached(kind, key, ".json")
    if path is not None:
        verify_checksum(path)
        stored = json.loads(path.read_text())
        if stored.get("config_hash") != config_hash(key):
            raise ArtifactError(f"{path} was computed for another key; {_rerun_hint(path)}")
        return stored["record"]
    path = artifact_path(kind, key, ".json")
    training_allowed(label or kind, path)
    record = compute()
    text = json.dumps({"config": json.loads(canonical_json(key)), "config_hash": config_hash(key), "record": record},
                      indent=1, sort_keys=True)
    atomic_write_text(path, text + "\n")
    record_checksum(path)
    _WRITTEN_THIS_PROCESS.add(path.resolve())
    return record


# --------------------------------------------------------------------------------------------------------------
# Trained models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """What every ``load_or_train_*`` returns: a model in eval mode, its training log and its provenance."""

    model: torch.nn.Module
    log: pd.DataFrame  # one row per training step; ``step`` first, then the curves by name
    trained: bool  # True: trained by this call; False: loaded from the data directory
    path: Path
    config: Any = None  # the recipe that produced the model (a profile's train config, a student's VSDConfig)
    metadata: dict[str, str] = field(default_factory=dict)  # the checkpoint's safetensors metadata
    label: str = ""  # what :meth:`status` calls the model; default: its class name
    tokenizer: Any = None  # the tokenizer trained with the model (the tiny CLIP's); None for the other kinds

    @property
    def trainable_parameters(self) -> int:
        """Parameters with ``requires_grad`` (a student's adapter tensors; 0 for the frozen teacher)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def status(self) -> str:
        verb = "trained now and saved as" if self.trained else "loaded from the cache"
        return f"{self.label or type(self.model).__name__}: {verb} {self.path.name}"


def log_tensors(log: Mapping[str, Sequence[float]] | pd.DataFrame) -> dict[str, torch.Tensor]:
    """Training curves as ``log.<name>`` float64 tensors, stored beside the weights in one checkpoint."""
    return {f"log.{k}": torch.tensor(pd.Series(v).tolist(), dtype=torch.float64) for k, v in dict(log).items()}


def split_log(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Inverse of :func:`log_tensors`: (weights, training curves)."""
    weights = {k: v for k, v in tensors.items() if not k.startswith("log.")}
    log = {k[4:]: v.tolist() for k, v in tensors.items() if k.startswith("log.")}
    return weights, log


def _log_frame(log: Mapping[str, Sequence[float]] | pd.DataFrame) -> pd.DataFrame:
    """The log as a DataFrame, the same on both paths of :func:`load_or_train`: integer ``step`` first, then
    the other curves sorted by name."""
    frame = pd.DataFrame(dict(log))
    frame = frame[[c for c in ("step",) if c in frame] + sorted(c for c in frame if c != "step")]
    return frame.astype({"step": int}) if "step" in frame else frame


def checkpoint_tensors(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model``: its state dict, or only the parameters with ``requires_grad``."""
    if trainable_only:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def load_weights_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path,
                        trainable_only: bool = False) -> None:
    """Copy ``weights`` into ``model``; every tensor of :func:`checkpoint_tensors` must be there, with its shape.

    Raises:
        ArtifactError: tensors missing, unexpected or of another shape (e.g. a pixel-space student's 3-channel
            ``conv_in`` for a latent model's 4), counted, with the first of each, the file and how to rebuild it.
    """
    targets = checkpoint_tensors(model, trainable_only)
    missing, unexpected = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    reshaped = [f"{name} {tuple(weights[name].shape)} for {tuple(targets[name].shape)}"
                for name in sorted(set(targets) & set(weights)) if targets[name].shape != weights[name].shape]
    if missing or unexpected or reshaped:
        found = ", ".join(f"{len(names)} {what} (e.g. {names[0]})" for what, names in
                          (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if names)
        raise ArtifactError(f"{path}: the stored parameters do not match the model its config builds: {found}; "
                            f"{_rerun_hint(path)}")
    if not trainable_only:
        model.load_state_dict(weights, strict=True)
        return
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(weights[name])


def load_or_train(
    kind: str,
    key: Any,
    build: Callable[[dict[str, str]], torch.nn.Module],
    train: Callable[[], tuple[torch.nn.Module, Mapping[str, Sequence[float]] | pd.DataFrame, dict[str, str]]],
    *,
    config: Any = None,
    label: str = "",
    trainable_only: bool = False,
) -> TrainedModel:
    """The artifact ``kind`` of ``key``: loaded from the data directory when cached, else trained and saved.

    Args:
        kind: the file's prefix, ``<data dir>/<kind>-<config_hash(key)>.safetensors``.
        key: everything that determines the artifact (configs, upstream digests); its hash names the file.
        build: ``build(metadata) -> model``, an untrained model of the architecture the checkpoint's metadata
            records; the stored weights are loaded into it.
        train: ``train() -> (model, log, metadata)``: the trained model, its training curves (equal-length
            columns) and the string metadata ``build`` needs, stored in the checkpoint.
        config: the recipe reported as :attr:`TrainedModel.config` (default: ``key``).
        label: what :meth:`TrainedModel.status` and the errors call the model (default: its class name).
        trainable_only: store only the parameters with ``requires_grad`` (a student's adapters) instead of the
            whole state dict; ``build`` must then return the frozen base with those parameters trainable.

    Raises:
        ArtifactError: the artifact is not cached and ``WADI_NO_TRAIN=1`` forbids training it, or the cached file
            is damaged (SHA256SUMS), corrupt, or from another config; the message names the notebook to rerun.
    """
    path = cached(kind, key)
    trained = path is None
    if not trained:
        tensors, metadata = load_checkpoint(path, key)
        weights, log = split_log(tensors)
        model = build(metadata)
        load_weights_strict(model, weights, path, trainable_only)
    else:
        path = artifact_path(kind, key)
        training_allowed(label or kind, path)
        model, log, extra = train()
        save_checkpoint(path, {**checkpoint_tensors(model, trainable_only), **log_tensors(log)}, key, **extra)
        metadata = read_metadata(path)
    return TrainedModel(model.eval(), _log_frame(log), trained, path, config=key if config is None else config,
                        metadata=metadata, label=label)
