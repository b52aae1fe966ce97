"""The GPU check behind ``make gpu-wheels`` / ``make gpu-check``: LoRaD's cost on a CUDA machine in one command.

``make gpu-check`` runs on a GPU machine that has torch and triton but no network, in three steps of
``python -m wadi_core.benchmarks gpu-check``:

1. ``--install-wheels gpu_wheels``: pip plans, without installing (``--dry-run --report``), what of
   :data:`GPU_CHECK_PACKAGES` the machine's Python lacks, from the wheels in ``gpu_wheels/`` only; those wheels
   are then unpacked into ``gpu_wheels/site`` (``--target``), which the check puts first on ``PYTHONPATH``. The
   machine's own environment is never changed, and nothing is written outside the repository.
2. the student step of WaDi's loop on a random-weight SD1.5 U-Net, ``python -m wadi_core.benchmarks sd15-step
   --device cuda --batch-size 16 --autocast fp16`` (64×64 latents, 77 text tokens) for our LoRaD (its Linears on
   the fused Triton kernels through :func:`wadi_core.kernels.lorad_linear`), the official forward hook
   (``hook_fn`` in ``train_dkd_sd.py``) and full fine-tuning: step time and peak CUDA memory in
   ``results/tables/benchmarks_gpu_sd15_step.*``;
3. the kernel benchmark, ``python -m wadi_core.benchmarks kernels`` in fp16 and bf16 under a time budget
   (``results/tables/benchmarks_kernels_<gpu>.csv``, which notebook 06 reads), summarised in
   ``benchmarks_gpu_kernels_summary.*``; the figure ``results/figures/benchmarks_gpu_check.{png,pdf}`` shows
   both.

``make gpu-wheels`` (where pip reaches the package index) fills ``gpu_wheels/`` beforehand: ``--wheel-pins``
lists :data:`GPU_CHECK_PACKAGES` and everything they need, at the versions installed here (requirements.txt's),
less torch, triton and the distributions named as already on the GPU machine, for ``pip download --no-deps``.

``--quick`` runs the same steps at the benchmarks' quick sizes, on the CPU when no GPU is visible (tests). This
module imports only the standard library (and, through its package, torch) at import time, so that step 1 runs
before any wheel is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

# What the check imports beyond torch and triton (wadi_core's adapters, backbones, benchmarks and reporting).
GPU_CHECK_PACKAGES = ("diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "tokenizers",
                      "numpy", "pandas", "matplotlib", "seaborn", "tabulate", "jinja2", "tqdm")
# The GPU machine's own: never downloaded, never installed over.
TORCH_DISTRIBUTIONS = ("torch", "triton")
STEP_VARIANTS = ("lorad", "official_hook", "full")
QUICK_STEP_VARIANTS = ("lorad", "official_hook")
VARIANT_COLORS = {"lorad": "#D55E00", "triton": "#D55E00", "official_hook": "#7f7f7f", "full": "#E69F00",
                  "reference": "#8fbc8f"}  # reporting.METHOD_COLORS for LoRaD and full FT, notebook 06's others


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_pins(packages: tuple[str, ...] = GPU_CHECK_PACKAGES, provided: tuple[str, ...] = (),
               python_version: str | None = None) -> list[str]:
    """``name==version`` of ``packages`` and of everything they need, read from this environment's metadata.

    The walk stops at torch, triton and ``provided`` (distributions the GPU machine is taken to have: neither
    they nor what only they need are listed). Requirement markers are evaluated for ``python_version`` (the GPU
    machine's Python, ``"3.12"``; default: this one's). RuntimeError names a needed distribution that is not
    installed here (``make venv`` installs them).
    """
    from packaging.requirements import Requirement

    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    environment = {"python_version": version, "python_full_version": f"{version}.0", "extra": ""}
    stop = {_canonical(name) for name in (*TORCH_DISTRIBUTIONS, *provided)}
    pins: dict[str, str] = {}
    todo = [_canonical(name) for name in packages]
    while todo:
        name = todo.pop()
        if name in pins or name in stop:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as error:
            raise RuntimeError(f"{name} is needed by the GPU check but not installed here; run make venv") from error
        pins[name] = distribution.version
        for line in distribution.requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(_canonical(requirement.name))
    return [f"{name}=={pins[name]}" for name in sorted(pins)]


def planned_wheels(report: dict) -> list[Path]:
    """The wheel files of a ``pip install --dry-run --report`` report's ``install`` list (local files only)."""
    paths = []
    for item in report.get("install", []):
        url = urlparse(item["download_info"]["url"])
        if url.scheme != "file":
            raise RuntimeError(f"pip planned to fetch {item['download_info']['url']}; only local wheels can be used")
        paths.append(Path(unquote(url.path)))
    return paths


def install_wheels(folder: Path, packages: tuple[str, ...] = GPU_CHECK_PACKAGES) -> list[str]:
    """Unpack into ``folder/site`` the wheels of ``folder`` that this Python needs for ``packages``.

    pip resolves against what is installed (``--dry-run``, nothing changes), from ``folder`` alone
    (``--no-index``); the planned wheels are installed with ``--no-deps --target folder/site``. Returns the
    installed wheels' names. RuntimeError with pip's message when a package is neither installed nor in
    ``folder`` (e.g. wheels made for another Python version).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RuntimeError(f"no wheel folder {folder}; run make gpu-wheels where pip reaches the package index")
    report_path, site = folder / "install_report.json", folder / "site"
    # pip ignores the machine's pip configuration (files, PIP_* variables: extra wheel folders, constraints) and
    # sees only folder/.
    pip = [sys.executable, "-m", "pip", "--isolated", "install", "--disable-pip-version-check", "--no-cache-dir",
           "--no-index"]
    isolated = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    plan = subprocess.run([*pip, "--dry-run", "--quiet", "--find-links", str(folder), "--report", str(report_path),
                           *packages], capture_output=True, text=True, env=isolated)
    if plan.returncode:
        raise RuntimeError(
            f"pip cannot satisfy {' '.join(packages)} from {folder} on Python {sys.version.split()[0]}:\n"
            f"{plan.stderr.strip()[-2000:]}\n(make gpu-wheels GPU_PYTHON_VERSION=<this Python's X.Y>, and leave "
            "what this machine lacks out of GPU_WHEELS_PROVIDED)")
    report = json.loads(report_path.read_text())
    replaced = sorted({_canonical(item["metadata"]["name"]) for item in report.get("install", [])}
                      & set(TORCH_DISTRIBUTIONS))
    if replaced:
        raise RuntimeError(f"pip would install its own {', '.join(replaced)} over this machine's; the check must "
                           f"run on the installed torch and triton (pip's plan: {report_path})")
    wheels = planned_wheels(report)
    shutil.rmtree(site, ignore_errors=True)
    if wheels:
        subprocess.run([*pip, "--quiet", "--no-deps", "--no-compile", "--upgrade", "--target", str(site),
                        *map(str, wheels)], check=True, env=isolated)
    return [wheel.name for wheel in wheels]


def _run_subcommand(module, argv: list[str]) -> None:
    """Run ``python -m wadi_core.benchmarks <module> argv`` in this process; RuntimeError if it fails."""
    parser = argparse.ArgumentParser(prog=f"gpu-check: {module.__name__}")
    module.add_arguments(parser)
    status = module.main(parser.parse_args(argv))
    if status:
        raise RuntimeError(f"{module.__name__} {' '.join(argv)} exited with {status}")


def run_gpu_check(quick: bool = False, kernel_budget_s: float = 150.0, repeats: int = 5,
                  batch_size: int = 16) -> dict[str, Path]:
    """Steps 2 and 3 of the module doc; returns the paths written (the step table, the kernel CSV and its summary,
    the figure).

    Needs a CUDA GPU (RuntimeError otherwise) unless ``quick``, which runs the quick sizes on the CPU when no
    GPU is visible, with ``_quick`` names.
    """
    import pandas as pd
    import torch

    from ..artifacts import results_dir
    from ..reporting import save_figure, save_table, set_theme
    from . import kernels, sd15_step

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif quick:
        device = torch.device("cpu")
    else:
        raise RuntimeError("make gpu-check needs a CUDA GPU and torch sees none (torch.cuda.is_available() is "
                           "False); run it on the GPU machine, or pass --quick for the tiny CPU run")
    tables = results_dir() / "tables"
    suffix = "_quick" if quick else ""
    start = time.monotonic()
    variants = QUICK_STEP_VARIANTS if quick else STEP_VARIANTS
    step_argv = ["--device", device.type, "--variants", ",".join(variants), "--autocast", "fp16",
                 "--batch-size", str(2 if quick else batch_size), "--repeats", str(1 if quick else repeats),
                 "--warmup", "0" if quick else "1"]
    if device.type == "cuda":  # the CPU builds the 860M-parameter U-Net before it moves to the GPU
        step_argv += ["--threads", str(os.cpu_count() or 1)]
    _run_subcommand(sd15_step, step_argv + (["--quick"] if quick else []))
    print(f"gpu-check: SD1.5 step done after {time.monotonic() - start:.0f} s")
    kernel_argv = ["--out", str(tables), "--device", device.type, "--budget-s", str(kernel_budget_s)]
    if device.type == "cuda":
        kernel_argv += ["--dtypes", "fp16,bf16"]
    _run_subcommand(kernels, kernel_argv + (["--quick", "--no-compile"] if quick else []))
    print(f"gpu-check: kernel benchmark done after {time.monotonic() - start:.0f} s")

    step_csv = tables / f"{sd15_step.table_stem(device, quick)}.csv"
    kernel_csv = tables / f"benchmarks_kernels_{kernels.device_slug(device)}{suffix}.csv"
    step = pd.read_csv(step_csv, index_col="variant")
    kernel_summary = kernels.summarise_kernel_benchmark(pd.read_csv(kernel_csv))
    summary_paths = save_table(kernel_summary, f"benchmarks_gpu_kernels_summary{suffix}",
                               caption=f"LoRaD kernels at SD1.5 shapes on {kernels.device_slug(device)}: the "
                                       "best Triton tile config against the GEMM floor, the reference and the hook")
    set_theme()
    figure_paths = save_figure(gpu_check_figure(kernel_summary, step), f"benchmarks_gpu_check{suffix}")
    print(summary_lines(kernel_summary, step))
    return {"sd15_step": step_csv, "kernels": kernel_csv, "kernel_summary": summary_paths[0],
            "figure": figure_paths[0]}


def summary_lines(kernel_summary, step) -> str:
    """What the check found, in a few lines: Triton against its bounds per dtype, LoRaD against the hook."""
    from .kernels import MAX_TRITON_TIME_VS_FLOOR, MIN_TRITON_SPEEDUP_VS_HOOK

    lines = []
    for dtype, rows in kernel_summary.groupby("dtype", sort=False):
        if rows["triton_ms"].isna().all():
            lines.append(f"kernels {dtype}: no Triton rows (see the kernel CSV's status and note columns)")
            continue
        lines.append(f"kernels {dtype}: Triton {rows['triton_vs_floor'].min():.2f}–{rows['triton_vs_floor'].max():.2f}"
                     f"× the floor (bound ≤ {MAX_TRITON_TIME_VS_FLOOR}), {rows['speedup_vs_hook'].min():.2f}–"
                     f"{rows['speedup_vs_hook'].max():.2f}× faster than the official hook (bound ≥ "
                     f"{MIN_TRITON_SPEEDUP_VS_HOOK})")
    memory = _memory_column(step)
    if {"lorad", "official_hook"} <= set(step.index):
        lorad, hook = step.loc["lorad"], step.loc["official_hook"]
        lines.append(f"SD1.5 step, LoRaD ({lorad['lorad_backend']}) vs official hook: time {lorad['time_s']:.3f} s vs "
                     f"{hook['time_s']:.3f} s ({lorad['time_s'] / hook['time_s']:.2f}×), {memory} "
                     f"{lorad[memory]:.2f} vs {hook[memory]:.2f} GiB ({lorad[memory] / hook[memory]:.2f}×)")
    return "\n".join(lines)


def _memory_column(step) -> str:
    return "cuda_peak_GiB" if "cuda_peak_GiB" in step.columns else "peak_rss_GiB"


def gpu_check_figure(kernel_summary, step, dtype: str = "fp16"):
    """Three panels: forward+backward time per SD1.5 Linear as a multiple of the GEMM floor (Triton, reference,
    official hook; ``dtype`` where measured, else the first dtype; the largest rank), and the SD1.5 student step's
    time and peak memory (CUDA where measured, else resident) per variant."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from .kernels import MAX_TRITON_TIME_VS_FLOOR

    measured_dtypes = list(dict.fromkeys(kernel_summary["dtype"]))
    dtype = dtype if dtype in measured_dtypes or not measured_dtypes else measured_dtypes[0]
    rows = kernel_summary[kernel_summary["dtype"] == dtype]
    rows = rows[rows["rank"] == rows["rank"].max()]
    ratios = pd.concat([pd.DataFrame({"shape": rows["shape"], "method": method,
                                      "vs_floor": rows[f"{method}_ms"] / rows["floor_ms"]})
                        for method in ("triton", "reference", "official_hook")]).dropna()
    fig, (ax_kernels, ax_time, ax_memory) = plt.subplots(1, 3, figsize=(15, 4.2),
                                                         gridspec_kw={"width_ratios": [2.4, 1, 1]})
    if ratios.empty:
        ax_kernels.text(0.5, 0.5, "no kernel measurements", ha="center", transform=ax_kernels.transAxes)
    else:
        sns.barplot(ratios, x="shape", y="vs_floor", hue="method", palette=VARIANT_COLORS, ax=ax_kernels)
    ax_kernels.axhline(1.0, color="black", linewidth=0.8)
    ax_kernels.axhline(MAX_TRITON_TIME_VS_FLOOR, color="black", linestyle="--", linewidth=0.8,
                       label=f"Triton bound {MAX_TRITON_TIME_VS_FLOOR}×")
    where = f"{dtype}, r = {rows['rank'].max()}, {rows['device'].iloc[0]}" if len(rows) else dtype
    ax_kernels.set(xlabel="", ylabel="forward+backward / floor", title=f"LoRaD per SD1.5 Linear ({where})")
    ax_kernels.tick_params(axis="x", labelrotation=60)
    ax_kernels.legend(fontsize="small")
    memory = _memory_column(step)
    colors = [VARIANT_COLORS.get(variant, "#56B4E9") for variant in step.index]
    memory_label = "peak CUDA memory (GiB)" if memory == "cuda_peak_GiB" else "peak resident memory (GiB)"
    for ax, column, label in ((ax_time, "time_s", "time (s)"), (ax_memory, memory, memory_label)):
        ax.bar(step.index, step[column], color=colors)
        ax.bar_label(ax.containers[0], fmt="%.3g", fontsize="small")
        ax.set(ylabel=label, title=f"SD1.5 student step: {label.split(' (')[0]}")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks gpu-check``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--wheel-pins", action="store_true",
                      help="print name==version of every wheel the check needs beyond torch/triton, and exit")
    mode.add_argument("--install-wheels", type=Path, metavar="FOLDER",
                      help="install into FOLDER/site what this Python lacks, from FOLDER's wheels, and exit")
    parser.add_argument("--provided", default="",
                        help="with --wheel-pins: distributions the GPU machine has (space- or comma-separated)")
    parser.add_argument("--python-version", help="with --wheel-pins: the GPU machine's Python, X.Y")
    parser.add_argument("--quick", action="store_true", help="quick sizes; on the CPU when no GPU is visible")
    parser.add_argument("--kernel-budget-s", type=float, default=150.0, help="time budget of the kernel benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timed SD1.5 steps per variant, median reported")
    parser.add_argument("--batch-size", type=int, default=16, help="latents per SD1.5 step")


def main(args: argparse.Namespace) -> int:
    """Print the wheel pins, install the wheels, or run the check (see the module doc); 2 on a setup error."""
    try:
        if args.wheel_pins:
            provided = tuple(args.provided.replace(",", " ").split())
            print("\n".join(wheel_pins(GPU_CHECK_PACKAGES, provided, args.python_version)))
        elif args.install_wheels is not None:
            installed = install_wheels(args.install_wheels)
            print(f"gpu-check: installed into {args.install_wheels / 'site'}: {', '.join(installed) or 'nothing'}")
        else:
            paths = run_gpu_check(args.quick, args.kernel_budget_s, args.repeats, args.batch_size)
            print("gpu-check wrote " + ", ".join(str(path) for path in paths.values()))
    except RuntimeError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    return 0
