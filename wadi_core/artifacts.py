"""Cached artifacts: config hashing, atomic writes, safetensors checkpoints that know their config.

Every expensive artifact (tiny CLIP, teacher, feature net, ...) is stored under the data directory as
``<kind>-<hash>.safetensors`` where ``hash`` is the SHA-256 (first 12 hex digits) of the canonical JSON of the
config that produced it. The config JSON travels inside the safetensors metadata, so a renamed or edited file
is detected on load. Nothing in ``data/`` is ever unpickled.

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
from dataclasses import dataclass
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_WRITTEN_THIS_PROCESS: set[Path] = set()  # with WADI_FRESH=1, artifacts retrained by this run are reused


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


def config_hash(config: Any) -> str:
    """First 12 hex digits of the SHA-256 of :func:`canonical_json`; names the artifact."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


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


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: Any, **metadata: str) -> None:
    """Atomically write ``tensors`` as safetensors, with the producing config and its hash as metadata."""
    meta = {"config": canonical_json(config), "config_hash": config_hash(config), **metadata}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    _WRITTEN_THIS_PROCESS.add(Path(path).resolve())


def _rerun_hint(what: str) -> str:
    return f"rebuild it with `FRESH=1 make reproduce ONLY=00` (or `python -m wadi_core.reproduce --fresh --only 00`) [{what}]"


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err}); {_rerun_hint(path.name)}") from err


def load_checkpoint(path: Path, config: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint written by :func:`save_checkpoint`, checking that ``config`` produced it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}; {_rerun_hint(path.name)}")
    meta = read_metadata(path)
    expected = config_hash(config)
    if meta.get("config_hash") != expected or config_hash(json.loads(meta.get("config", "null"))) != expected:
        raise ArtifactError(
            f"{path} was produced by config hash {meta.get('config_hash')!r}, but the current config hashes to "
            f"{expected!r}; {_rerun_hint(path.name)}"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} failed to load ({err}); {_rerun_hint(path.name)}") from err
    return tensors, meta


def _written_this_run(path: Path) -> bool:
    """Written by this process, or (``WADI_FRESH_SINCE`` set) by any process of this run since that time."""
    if path.resolve() in _WRITTEN_THIS_PROCESS:
        return True
    since = os.environ.get("WADI_FRESH_SINCE")
    return bool(since) and path.stat().st_mtime >= float(since)


def cached(kind: str, config: Any) -> Path | None:
    """Path of a usable cached artifact, or None when it is absent or older than this run under
    ``WADI_FRESH=1`` (a fresh run retrains each artifact once, then reuses what it trained)."""
    path = artifact_path(kind, config)
    if not path.exists() or (fresh_requested() and not _written_this_run(path)):
        return None
    return path


def training_allowed(kind: str, path: Path) -> None:
    """Raise when ``WADI_NO_TRAIN=1`` forbids training the missing artifact ``kind`` at ``path``."""
    if os.environ.get("WADI_NO_TRAIN", "0") not in ("", "0", "false", "False"):
        raise ArtifactError(f"{kind} is not cached at {path} and WADI_NO_TRAIN=1 forbids training it; "
                            + _rerun_hint(path.name))


@dataclass
class TrainedModel:
    """A model with its training log and whether it was just trained (False: loaded from ``data/``)."""

    model: torch.nn.Module
    log: dict[str, list[float]]
    trained: bool
    path: Path

    def status(self) -> str:
        verb = "trained now and saved as" if self.trained else "loaded from the cache"
        return f"{type(self.model).__name__}: {verb} {self.path.name}"


def log_tensors(log: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Training curves as ``log.<name>`` float64 tensors, stored beside the weights in one checkpoint."""
    return {f"log.{k}": torch.tensor(v, dtype=torch.float64) for k, v in log.items()}


def split_log(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Inverse of :func:`log_tensors`: (weights, training curves)."""
    weights = {k: v for k, v in tensors.items() if not k.startswith("log.")}
    log = {k[4:]: v.tolist() for k, v in tensors.items() if k.startswith("log.")}
    return weights, log


def load_weights_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{path} does not match its model config ({err}); {_rerun_hint(path.name)}") from err
