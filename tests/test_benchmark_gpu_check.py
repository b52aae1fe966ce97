"""The GPU check (``make gpu-wheels`` / ``make gpu-check``, ``python -m wadi_core.benchmarks gpu-check``) on the CPU:
the wheel list is this environment's pinned closure without torch, triton and what the GPU machine provides; the
installer plans with pip against the installed packages, never touches torch or triton, and reports what it cannot
find; without a GPU the check refuses clearly, and ``--quick`` runs its whole code path, writing tables and a figure
named as results/ requires. Timings are never asserted."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from wadi_core.artifacts import REPO_ROOT
from wadi_core.benchmarks import gpu_check
from wadi_core.benchmarks.__main__ import main

RESULT_FILE = re.compile(r"^(\d\d|benchmarks)_[a-z0-9_.-]+\.(csv|md|tex|png|pdf)$")  # tests/test_results_layout.py


def _pins(lines: list[str]) -> dict[str, str]:
    return dict(line.split("==") for line in lines)


def test_wheel_pins_are_the_installed_closure_without_torch():
    pins = _pins(gpu_check.wheel_pins())
    assert {"diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "tokenizers"} <= set(pins)
    assert {"regex", "pyyaml", "requests", "filelock", "tqdm", "numpy", "python-dateutil"} <= set(pins)  # their needs
    assert not {"torch", "triton", "sympy", "networkx"} & set(pins)  # torch's own, and what only torch needs
    assert all(version == importlib.metadata.version(name) for name, version in pins.items())
    required = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M))
    for name, version in required.items():  # requirements.txt's versions
        canonical = name.lower().replace("_", "-")
        assert pins.get(canonical, version) == version, name


def test_provided_distributions_and_what_only_they_need_are_left_out():
    full = _pins(gpu_check.wheel_pins())
    lean = _pins(gpu_check.wheel_pins(provided=("numpy", "pandas", "matplotlib", "seaborn", "pillow")))
    assert not {"numpy", "pandas", "matplotlib", "seaborn", "pillow", "python-dateutil", "kiwisolver"} & set(lean)
    assert {"diffusers", "transformers", "tabulate"} <= set(lean) and set(lean) < set(full)


def test_cli_prints_the_pins(capsys):
    assert main(["gpu-check", "--wheel-pins", "--provided", "numpy,pandas", "--python-version", "3.12"]) == 0
    lines = capsys.readouterr().out.split()
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(set(names)) and "diffusers" in names
    assert not any(line.startswith(("numpy==", "pandas==")) for line in lines)


def test_planned_wheels_are_local_files():
    report = {"install": [{"metadata": {"name": "torch"},
                           "download_info": {"url": "file:///repo/gpu_wheels/torch-2.0%2Bcpu-py3-none-any.whl"}}]}
    assert gpu_check.planned_wheels(report) == [Path("/repo/gpu_wheels/torch-2.0+cpu-py3-none-any.whl")]
    report["install"][0]["download_info"]["url"] = "https://example.invalid/x.whl"
    with pytest.raises(RuntimeError, match="only local wheels"):
        gpu_check.planned_wheels(report)


def test_installed_packages_need_no_wheel(tmp_path):
    assert gpu_check.install_wheels(tmp_path, ("tqdm", "pandas")) == []
    assert not (tmp_path / "site").exists()


def test_a_package_neither_installed_nor_in_the_folder_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-distribution-for-the-gpu-check"):
        gpu_check.install_wheels(tmp_path, ("no-such-distribution-for-the-gpu-check",))
    with pytest.raises(RuntimeError, match="make gpu-wheels"):
        gpu_check.install_wheels(tmp_path / "missing")


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel holding one empty module."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}_gpu_check_probe.py", "")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_missing_wheels_go_to_the_site_folder_and_torch_is_never_replaced(tmp_path):
    _wheel(tmp_path, "wadi_probe", "1.0")
    assert gpu_check.install_wheels(tmp_path, ("wadi-probe", "tqdm")) == ["wadi_probe-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / "wadi_probe_gpu_check_probe.py").exists()
    _wheel(tmp_path, "triton", "999.0")
    with pytest.raises(RuntimeError, match="over this machine's"):
        gpu_check.install_wheels(tmp_path, ("triton==999.0",))


def test_the_cli_needs_a_gpu_unless_quick(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert main(["gpu-check"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_importing_the_check_imports_no_wheel_it_installs():
    """Step 1 (--install-wheels) runs before diffusers, transformers, pandas or matplotlib are installed."""
    code = ("import sys; from wadi_core.benchmarks.__main__ import build_parser; build_parser(['gpu-check']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'accelerate', "
            "'pandas', 'matplotlib', 'seaborn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_figure_shows_kernels_step_time_and_cuda_memory():
    kernels = pd.DataFrame({"device": "nvidia_h200", "dtype": ["fp16", "fp16", "bf16"], "shape": ["a", "b", "a"],
                            "rank": 256, "floor_ms": 1.0, "triton_ms": [1.1, 1.3, 1.2], "reference_ms": 2.0,
                            "official_hook_ms": 3.0})
    kernels = kernels.assign(triton_vs_floor=kernels["triton_ms"], speedup_vs_hook=3.0 / kernels["triton_ms"])
    step = pd.DataFrame({"lorad_backend": ["triton", None, None], "time_s": [0.5, 0.9, 0.6],
                         "cuda_peak_GiB": [30.0, 40.0, 35.0]},
                        index=pd.Index(["lorad", "official_hook", "full"], name="variant"))
    fig = gpu_check.gpu_check_figure(kernels, step)
    try:
        kernel_ax, time_ax, memory_ax = fig.axes
        assert len(kernel_ax.patches) >= 6  # three methods at the two fp16 shapes
        assert "fp16" in kernel_ax.get_title() and memory_ax.get_ylabel() == "peak CUDA memory (GiB)"
        assert [bar.get_height() for bar in time_ax.patches] == [0.5, 0.9, 0.6]
    finally:
        plt.close(fig)
    lines = gpu_check.summary_lines(kernels, step)
    assert "kernels fp16: Triton 1.10–1.30× the floor" in lines and "bf16" in lines
    assert "LoRaD (triton) vs official hook: time 0.500 s vs 0.900 s (0.56×)" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick runs on the GPU when one is visible")
def test_quick_check_on_the_cpu_writes_its_tables_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WADI_RESULTS_DIR", str(tmp_path))
    assert main(["gpu-check", "--quick"]) == 0
    written = sorted(path.name for kind in ("tables", "figures") for path in (tmp_path / kind).iterdir())
    assert all(RESULT_FILE.match(name) for name in written), written
    assert {"benchmarks_kernels_cpu_quick.csv", "benchmarks_sd15_step_quick.csv",
            "benchmarks_gpu_kernels_summary_quick.csv", "benchmarks_gpu_check_quick.png"} <= set(written)
    step = pd.read_csv(tmp_path / "tables" / "benchmarks_sd15_step_quick.csv", index_col="variant")
    assert step.index.tolist() == list(gpu_check.QUICK_STEP_VARIANTS)
    assert step.loc["lorad", "lorad_backend"] == "reference" and step.loc["lorad", "time_vs_official_hook"] > 0
    assert "SD1.5 step, LoRaD (reference) vs official hook" in capsys.readouterr().out
