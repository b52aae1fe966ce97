"""Run the numbered notebooks headlessly with papermill and record the run in ``results/manifest.json``.

``make reproduce`` calls this module; these two lines are equivalent::

    ONLY=00 make reproduce
    python -m wadi_core.reproduce --profile tiny --only 00

Each selected ``notebooks/NN_name.ipynb`` runs in id order in a fresh ``python3`` kernel whose working directory
is the notebooks folder and whose ``parameters`` cell receives ``profile``. By default the executed notebook
replaces its input (that is how the committed notebooks are produced); ``--output-dir`` writes it elsewhere.
The output is renamed into place only after a successful run; a failing notebook is kept beside it as
``NN_name.failed.ipynb`` (traceback included) and the run stops.

The kernel inherits this process's environment, which the options extend (see :mod:`wadi_core.artifacts`):
``--data-dir`` sets ``WADI_DATA_DIR``, ``--results-dir`` sets ``WADI_RESULTS_DIR``, ``--fresh`` sets
``WADI_FRESH=1`` and ``--block-network`` puts ``wadi_core/_offline_guard`` (a ``sitecustomize`` that refuses
non-loopback connections) first on ``PYTHONPATH`` and sets the model-hub offline switches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

import nbformat
import papermill

from wadi_core.artifacts import REPO_ROOT, atomic_write_text, results_dir
from wadi_core.profiles import PROFILE_NAMES, get_profile

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
FAILED_SUFFIX = ".failed.ipynb"
GUARD_DIR = Path(__file__).resolve().parent / "_offline_guard"
OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class NotebookFailed(RuntimeError):
    """A cell raised; ``failed_copy`` is the executed notebook with the traceback."""

    def __init__(self, message: str, failed_copy: Path, wall_time_s: float):
        super().__init__(message)
        self.failed_copy = failed_copy
        self.wall_time_s = wall_time_s


# --- which notebooks --------------------------------------------------------------------------------------


def discover_notebooks(notebooks_dir: Path) -> dict[str, Path]:
    """Map each two-digit id to its ``NN_name.ipynb``, in id order (``*.failed.ipynb`` copies excluded)."""
    found = {}
    for path in sorted(Path(notebooks_dir).glob(NOTEBOOK_GLOB)):
        if path.name.endswith(FAILED_SUFFIX):
            continue
        notebook_id = path.name[:2]
        if notebook_id in found:
            raise ValueError(f"two notebooks share id {notebook_id}: {found[notebook_id].name} and {path.name}")
        found[notebook_id] = path
    return found


def select_notebooks(available: dict[str, Path], only: list[str] | None) -> list[Path]:
    """The notebooks named by ``only`` (every one when None), in id order; unknown ids raise ValueError."""
    if only is None:
        return list(available.values())
    unknown = [notebook_id for notebook_id in only if notebook_id not in available]
    if unknown:
        listing = ", ".join(f"{i} ({p.stem})" for i, p in available.items()) or "none"
        raise ValueError(f"unknown notebook id(s) {', '.join(unknown)}; available: {listing}")
    return [path for notebook_id, path in available.items() if notebook_id in only]


def _parse_ids(text: str) -> list[str]:
    """``"0,03"`` -> ``["00", "03"]``."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids or not all(re.fullmatch(r"\d{1,2}", part) for part in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated notebook ids such as 00,03, got {text!r}")
    return [part.zfill(2) for part in ids]


# --- the kernel's environment -----------------------------------------------------------------------------


def kernel_environment(
    *, data_dir: Path | None, results: Path | None, fresh: bool, block_network: bool
) -> dict[str, str]:
    """Environment variables to add for the kernels (paths made absolute: the kernel runs in notebooks/)."""
    env = {}
    for name, given in (("WADI_DATA_DIR", data_dir), ("WADI_RESULTS_DIR", results)):
        value = given or os.environ.get(name)
        if value:
            env[name] = str(Path(value).resolve())
    if fresh:  # every notebook of this run reuses what an earlier one retrained (artifacts.cached)
        env["WADI_FRESH"] = "1"
        env["WADI_FRESH_SINCE"] = os.environ.get("WADI_FRESH_SINCE") or repr(time.time())
    if block_network:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD_DIR), os.environ.get("PYTHONPATH")) if p)
        env.update(OFFLINE_SWITCHES)
    return env


@contextmanager
def patched_environ(updates: dict[str, str]) -> Iterator[None]:
    """Set ``updates`` in ``os.environ`` (which the kernels inherit) and restore the old values afterwards."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- running one notebook ---------------------------------------------------------------------------------


def execute_notebook(notebook: Path, output: Path, profile: str) -> float:
    """Execute ``notebook`` into ``output`` atomically; return the wall time in seconds.

    Raises:
        NotebookFailed: a cell raised; the executed copy is left at ``NN_name.failed.ipynb`` beside ``output``.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    failed_copy = output.with_name(output.stem + FAILED_SUFFIX)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.stem}.", suffix=".tmp.ipynb")
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.perf_counter()
    try:
        try:
            papermill.execute_notebook(
                str(notebook),
                str(tmp),
                parameters={"profile": profile},
                kernel_name="python3",
                cwd=str(notebook.parent),
                progress_bar=False,
            )
        except papermill.PapermillExecutionError as err:
            wall_time_s = time.perf_counter() - start
            _tidy_papermill_metadata(tmp, notebook, failed_copy)
            os.replace(tmp, failed_copy)
            cell = f"cell [{err.exec_count}] (index {err.cell_index})"
            message = f"FAILED: notebook {notebook.stem}, {cell}: {err.ename}: {err.evalue}"
            raise NotebookFailed(message, failed_copy, wall_time_s) from err
        wall_time_s = time.perf_counter() - start
        _tidy_papermill_metadata(tmp, notebook, output)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    failed_copy.unlink(missing_ok=True)  # a stale copy from an earlier failure
    return wall_time_s


def _tidy_papermill_metadata(executed: Path, notebook: Path, output: Path) -> None:
    """Record bare file names instead of this machine's (temporary) paths in the papermill metadata."""
    nb = nbformat.read(executed, as_version=4)
    nb.metadata.setdefault("papermill", {}).update(input_path=notebook.name, output_path=output.name)
    nbformat.write(nb, executed)


# --- the manifest -----------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _pinned_packages() -> list[str]:
    """Package names listed in requirements.txt."""
    names = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0])
    return names


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_run(profile: str) -> dict:
    """Everything that identifies a run: profile, seeds, git commit, interpreter, platform and package versions."""
    import torch  # imported here: building the parser and checking arguments should stay fast

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    run = {
        "profile": profile,
        "git": {"commit": commit, "dirty": bool(status) if status is not None else None},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        run["seeds"] = get_profile(profile).seeds
    except (RuntimeError, ValueError) as err:  # e.g. 'paper' without a GPU
        run["seeds"] = None
        run["seeds_error"] = str(err)
    run["packages"] = {name: _installed_version(name) for name in _pinned_packages()}
    return run


def read_notebook_entries(manifest: Path) -> dict[str, dict]:
    """The per-notebook entries of an existing manifest ({} when it is absent or unreadable)."""
    try:
        return dict(json.loads(manifest.read_text()).get("notebooks", {}))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as err:
        print(f"warning: ignoring unreadable {manifest} ({err})", file=sys.stderr)
        return {}


def write_manifest(manifest: Path, run: dict, entries: dict[str, dict]) -> None:
    """Atomically write the run description plus the per-notebook entries."""
    data = {**run, "updated_at": _now(), "notebooks": dict(sorted(entries.items()))}
    atomic_write_text(manifest, json.dumps(data, indent=2) + "\n")


def _entry(run: dict, status: str, wall_time_s: float, output: Path, **extra: str) -> dict:
    """One notebook's manifest entry; profile and commit are repeated because ``--only`` merges entries."""
    return {
        "status": status,
        "profile": run["profile"],
        "git_commit": run["git"]["commit"],
        "wall_time_s": round(wall_time_s, 1),
        "finished_at": _now(),
        "output": _display_path(output),
        **extra,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


# --- the run ----------------------------------------------------------------------------------------------


def run_notebooks(
    notebooks: list[Path], profile: str, *, output_dir: Path | None, manifest: Path, merge: bool
) -> int:
    """Execute ``notebooks`` in order, updating ``manifest`` after each; stop at the first failure.

    Returns:
        0 when every notebook ran, 1 when one failed.
    """
    run = describe_run(profile)
    entries: dict[str, dict] = {}

    def record(name: str, entry: dict) -> None:
        if merge:  # read again: another --only run beside this one may have written its entries meanwhile
            entries.update(read_notebook_entries(manifest))
        entries[name] = entry
        write_manifest(manifest, run, entries)

    for position, notebook in enumerate(notebooks, start=1):
        output = (output_dir or notebook.parent) / notebook.name
        print(f"[{position}/{len(notebooks)}] {notebook.stem} (profile={profile}) ... ", end="", flush=True)
        try:
            wall_time_s = execute_notebook(notebook, output, profile)
        except NotebookFailed as err:
            print(f"failed after {err.wall_time_s:.1f} s", flush=True)
            record(notebook.stem, _entry(run, "failed", err.wall_time_s, err.failed_copy, error=str(err)))
            print(f"{err}\nexecuted copy with the traceback: {err.failed_copy}", file=sys.stderr, flush=True)
            return 1
        print(f"ok in {wall_time_s:.1f} s", flush=True)
        record(notebook.stem, _entry(run, "ok", wall_time_s, output))
    print(f"manifest: {manifest}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m wadi_core.reproduce``."""
    parser = argparse.ArgumentParser(
        prog="python -m wadi_core.reproduce",
        description="Execute the numbered notebooks with papermill and record the run in results/manifest.json.",
    )
    parser.add_argument("--profile", default="tiny", choices=PROFILE_NAMES, help="run profile (default: tiny)")
    parser.add_argument("--only", type=_parse_ids, metavar="IDS", help="comma-separated notebook ids, e.g. 00,03")
    parser.add_argument("--fresh", action="store_true", help="ignore cached artifacts and retrain (WADI_FRESH=1)")
    for option, help_text in (
        ("--notebooks-dir", "where NN_name.ipynb live (default: notebooks/)"),
        ("--output-dir", "write the executed notebooks here (default: in place)"),
        ("--data-dir", "artifact cache directory (WADI_DATA_DIR)"),
        ("--results-dir", "figures, tables and manifest.json (WADI_RESULTS_DIR)"),
    ):
        parser.add_argument(option, type=Path, metavar="DIR", help=help_text)
    parser.add_argument(
        "--block-network", action="store_true", help="refuse non-loopback connections inside the kernels"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (argument errors exit with 2 via argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    notebooks_dir = args.notebooks_dir or NOTEBOOKS_DIR
    try:
        notebooks = select_notebooks(discover_notebooks(notebooks_dir), args.only)
    except ValueError as err:
        parser.error(str(err))
    if not notebooks:
        parser.error(f"no numbered notebooks ({NOTEBOOK_GLOB}) in {notebooks_dir}")
    env = kernel_environment(
        data_dir=args.data_dir, results=args.results_dir, fresh=args.fresh, block_network=args.block_network
    )
    with patched_environ(env):
        manifest = results_dir() / "manifest.json"
        return run_notebooks(
            notebooks, args.profile, output_dir=args.output_dir, manifest=manifest, merge=args.only is not None
        )


if __name__ == "__main__":
    sys.exit(main())
