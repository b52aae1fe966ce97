"""Behaviour of the notebook runner (``python -m wadi_core.reproduce``) and of its offline guard.

Two tiny synthetic notebooks are executed (about 3 s each); everything else is argument handling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from wadi_core import reproduce


def _write_notebook(path: Path, *cells: str) -> Path:
    """A notebook with a ``parameters`` cell (``profile = "tiny"``) followed by ``cells``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell('profile = "tiny"')
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, *(nbformat.v4.new_code_cell(source) for source in cells)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_unknown_profile_exits_2_listing_profiles(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--profile", "huge", "--notebooks-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "huge" in err and all(name in err for name in ("smoke", "tiny", "paper"))
    assert "Traceback" not in err


def test_unknown_notebook_id_exits_2_listing_available_ids(tmp_path, capsys):
    _write_notebook(tmp_path / "00_first.ipynb", "pass")
    _write_notebook(tmp_path / "03_third.ipynb", "pass")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "00,07", "--notebooks-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "07" in err and "00 (00_first)" in err and "03 (03_third)" in err


def test_discovery_orders_by_id_and_skips_failed_copies(tmp_path):
    for name in ("03_b.ipynb", "00_a.ipynb", "00_a.failed.ipynb", "notes.ipynb", ".00_a.x.tmp.ipynb"):
        (tmp_path / name).write_text("{}")
    found = reproduce.discover_notebooks(tmp_path)
    assert list(found) == ["00", "03"] and found["00"].name == "00_a.ipynb"
    assert reproduce.select_notebooks(found, reproduce._parse_ids("3")) == [tmp_path / "03_b.ipynb"]


def test_block_network_environment_prepends_guard(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = reproduce.kernel_environment(data_dir=Path("rel"), results=None, fresh=True, block_network=True)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(reproduce.GUARD_DIR), "/elsewhere"]
    assert env["WADI_FRESH"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert float(env["WADI_FRESH_SINCE"]) <= time.time()
    assert Path(env["WADI_DATA_DIR"]).is_absolute()


def test_run_writes_executed_notebook_and_manifest(tmp_path, capsys):
    source = tmp_path / "notebooks"
    _write_notebook(source / "00_hello.ipynb", "import os\nprint('profile:', profile, os.environ['WADI_FRESH'])")
    out, results = tmp_path / "out", tmp_path / "results"
    argv = ["--profile", "smoke", "--fresh", "--notebooks-dir", str(source)]
    code = reproduce.main([*argv, "--output-dir", str(out), "--results-dir", str(results)])
    assert code == 0
    assert "[1/1] 00_hello (profile=smoke) ... ok in" in capsys.readouterr().out
    assert "profile: smoke 1" in _stream_text(nbformat.read(out / "00_hello.ipynb", as_version=4))
    assert sorted(p.name for p in out.iterdir()) == ["00_hello.ipynb"]  # no temporary file left behind
    assert "WADI_FRESH" not in os.environ  # the kernel's environment does not leak into this process

    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["profile"] == "smoke" and manifest["seeds"]["teacher"] == 2
    assert manifest["packages"]["papermill"] == "2.7.0"
    entry = manifest["notebooks"]["00_hello"]
    assert entry["status"] == "ok" and entry["output"].endswith("00_hello.ipynb")


def test_failing_notebook_exits_1_names_cell_and_keeps_earlier_entries(tmp_path, capsys):
    source = tmp_path / "notebooks"
    notebook = _write_notebook(source / "01_broken.ipynb", "x = 1", "raise ValueError('bad shape')")
    original = notebook.read_bytes()
    results = tmp_path / "results"
    results.mkdir()
    earlier = {"profile": "tiny", "notebooks": {"00_hello": {"status": "ok"}}}
    (results / "manifest.json").write_text(json.dumps(earlier))

    code = reproduce.main(["--only", "01", "--notebooks-dir", str(source), "--results-dir", str(results)])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED: notebook 01_broken, cell [4] (index 3): ValueError: bad shape" in err
    assert notebook.read_bytes() == original  # in-place output: the input is untouched on failure
    failed = source / "01_broken.failed.ipynb"
    assert "bad shape" in json.dumps(nbformat.read(failed, as_version=4).cells[-1].outputs)

    entries = json.loads((results / "manifest.json").read_text())["notebooks"]
    assert entries["00_hello"] == {"status": "ok"}  # --only merges into the existing manifest
    assert entries["01_broken"]["status"] == "failed"


def test_only_runs_side_by_side_keep_each_others_entries(tmp_path):
    source = tmp_path / "notebooks"
    results = tmp_path / "results"
    results.mkdir()
    manifest = results / "manifest.json"
    # the other run writes its entry while this one executes (from inside this run's notebook)
    _write_notebook(source / "01_slow.ipynb", "import json, pathlib",
                    f"p = pathlib.Path({str(manifest)!r}); m = json.loads(p.read_text()) if p.exists() else "
                    "{'notebooks': {}}; m['notebooks']['00_other'] = {'status': 'ok'}; p.write_text(json.dumps(m))")
    code = reproduce.main(["--only", "01", "--notebooks-dir", str(source), "--results-dir", str(results)])
    assert code == 0
    entries = json.loads(manifest.read_text())["notebooks"]
    assert entries["00_other"] == {"status": "ok"} and entries["01_slow"]["status"] == "ok"


GUARD_PROBE = textwrap.dedent(
    """
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=5)
    except OSError as err:
        print("blocked:", err)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(("localhost", server.getsockname()[1]), timeout=5)
    peer, _ = server.accept()
    client.sendall(b"ping")
    print("loopback:", peer.recv(4).decode())
    """
)


def test_offline_guard_blocks_remote_hosts_but_not_loopback():
    env = {**os.environ, "PYTHONPATH": str(reproduce.GUARD_DIR)}
    done = subprocess.run(
        [sys.executable, "-c", GUARD_PROBE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert "blocked: network access blocked in an offline run: huggingface.co" in done.stdout
    assert "loopback: ping" in done.stdout
