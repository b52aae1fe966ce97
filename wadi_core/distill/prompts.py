"""Training prompts of the distillation command (WaDi §3.3: VSD trains on text alone, 1.4M JourneyDB prompts).

:func:`load_prompts` detects the file's form by its content:

- a JourneyDB ``train_anno.jsonl``: one JSON object per line, the caption under ``"Task2"`` → ``"Caption"``
  (rows look like ``{"img_path": ..., "prompt": ..., "Task2": {"Caption": "...", ...}}``; the Midjourney
  ``"prompt"`` is not used). It is read as the official ``dataset.py`` (``TextPromptDataset``) reads it: empty
  captions dropped, de-duplicated, sorted, then shuffled by ``random.seed(2023); random.shuffle``. Given the same
  file this reproduces the official order exactly (``random.Random(2023).shuffle`` draws the same permutation), so
  the first N prompts are the official run's first N. The result is cached as ``train_prompt.jsonl`` in the
  same format as the official cache (one JSON array);
- a JSON-lines file of ``{"prompt": ...}`` or ``{"caption": ...}`` rows, a plain text file with one prompt per
  line (stripped), or an official ``train_prompt.jsonl`` cache (one JSON array of prompts): taken as they are, in
  file order, blank prompts dropped.

A JSON-lines file is JourneyDB's when its first row has a ``"Task2"`` key.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..artifacts import atomic_path

OFFICIAL_SHUFFLE_SEED = 2023  # dataset.py: random.seed(2023) before random.shuffle
PROMPT_CACHE_NAME = "train_prompt.jsonl"  # dataset.py's name for the processed train_anno.jsonl
PROMPT_CACHE_SOURCE_NAME = "train_prompt.source.json"  # which file (size, mtime) the cache was built from
CAPTION_KEYS = ("Caption", "Caption:", "caption")  # the Task2 keys dataset.py accepts
PROMPT_KEYS = ("prompt", "caption")  # the keys of a plain prompt JSON-lines row
_EXPECTED = ("a JourneyDB train_anno.jsonl (one JSON object per line with the caption under "
             '"Task2" → "Caption"), a .jsonl of {"prompt": ...} or {"caption": ...} rows, a text file with one '
             "prompt per line, or a JSON array of prompts")


def load_prompts(path: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """The training prompts in ``path`` (JourneyDB, prompt JSON lines, text or a JSON array; see the module doc).

    A JourneyDB file is de-duplicated, sorted and shuffled with seed 2023 as the official ``dataset.py`` does;
    with ``cache_dir`` the result is cached there as ``train_prompt.jsonl`` (written atomically, reused while
    ``path`` keeps its size and modification time). Other forms keep their file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an empty file, a line that is not valid JSON or not a JSON object (its line number is named),
            or a file in which no row holds a usable prompt; the message names the file and what it expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; expected {_EXPECTED}")
    with path.open(encoding="utf-8") as handle:
        number, first = next(((n, line.strip()) for n, line in enumerate(handle, 1) if line.strip()), (0, ""))
    if not first:
        raise ValueError(f"prompt file {path} is empty; expected {_EXPECTED}")
    if first.startswith("["):
        return _json_array_prompts(path)
    if not first.startswith("{"):
        return _text_prompts(path)
    if "Task2" not in _parse_row(first, path, number):
        return _json_line_prompts(path)
    if cache_dir is None:
        return _journeydb_prompts(path)
    return _cached_journeydb_prompts(path, Path(cache_dir))


def _parse_row(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); expected "
                         f"{_EXPECTED}") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; expected {_EXPECTED}")
    return row


def _rows(path: Path):
    """(line number, JSON object) of every non-blank line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, _parse_row(line, path, number)


def _no_prompts(path: Path, what: str) -> ValueError:
    return ValueError(f"prompt file {path} holds no usable prompt: {what}; expected {_EXPECTED}")


def _journeydb_caption(row: dict) -> str | None:
    task = row.get("Task2")
    if not isinstance(task, dict):
        return None
    caption = next((task[key] for key in CAPTION_KEYS if key in task), None)
    return caption if isinstance(caption, str) and caption else None


def _journeydb_prompts(path: Path) -> list[str]:
    """``TextPromptDataset``'s processing: captions, empty ones dropped, unique, sorted, shuffled with 2023."""
    captions = {caption for _, row in _rows(path) if (caption := _journeydb_caption(row)) is not None}
    if not captions:
        raise _no_prompts(path, 'no row has a non-empty "Task2" → "Caption"')
    prompts = sorted(captions)
    random.Random(OFFICIAL_SHUFFLE_SEED).shuffle(prompts)
    return prompts


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_journeydb_prompts(path: Path, cache_dir: Path) -> list[str]:
    cache, stamp_path = cache_dir / PROMPT_CACHE_NAME, cache_dir / PROMPT_CACHE_SOURCE_NAME
    stamp = _source_stamp(path)
    try:
        if json.loads(stamp_path.read_text()) == stamp:
            prompts = json.loads(cache.read_text(encoding="utf-8"))
            if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
                return prompts
    except (OSError, ValueError):
        pass  # no cache, or one that cannot be read: rebuild it
    prompts = _journeydb_prompts(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # a cache without its stamp is never reused
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps(prompts), encoding="utf-8")  # the official cache's bytes (json.dump of a list)
    with atomic_path(stamp_path) as tmp:
        tmp.write_text(json.dumps(stamp))
    return prompts


def _json_line_prompts(path: Path) -> list[str]:
    prompts = []
    for _, row in _rows(path):
        text = next((row[key] for key in PROMPT_KEYS if isinstance(row.get(key), str)), "")
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise _no_prompts(path, 'no row has a non-empty "prompt" or "caption" string')
    return prompts


def _text_prompts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _json_array_prompts(path: Path) -> list[str]:
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not a valid JSON array of prompts ({err.msg}); expected "
                         f"{_EXPECTED}") from err
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path}: a JSON array must hold prompt strings only; expected {_EXPECTED}")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise _no_prompts(path, "the JSON array holds no non-blank prompt")
    return prompts


__all__ = ["CAPTION_KEYS", "OFFICIAL_SHUFFLE_SEED", "PROMPT_CACHE_NAME", "load_prompts"]
