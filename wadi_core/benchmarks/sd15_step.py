"""One student forward+backward of the real SD1.5 U-Net architecture, per way of training it (WaDi §3.2).

``python -m wadi_core.benchmarks sd15-step`` builds ``UNet2DConditionModel`` from the bundled SD1.5 config
(``data/model_configs/sd15_unet.json``) with random weights and times the student's call of the WaDi loop,
ε̂ = G(z, 999, c), with its backward, at a 64×64 latent and 77 text tokens of 768 dimensions: by default fp32 on
the CPU at batch 1; ``--device cuda --batch-size 16 --autocast fp16`` is the GPU step of ``make gpu-check``
(fp32 weights under fp16 autocast, as the official training's mixed precision). Variants (:data:`VARIANTS`):

- ``lorad``: our :class:`~wadi_core.adapters.LoRaDLinear` at the paper's student rank 256 on the student rule
  (:func:`wadi_core.adapters.inject`; the 182 Linears under down_blocks, mid_block, up_blocks). Its forward goes
  through :func:`wadi_core.kernels.lorad_linear`: the fused Triton kernels on CUDA, the reference on the CPU
  (column ``lorad_backend``);
- ``official_hook``: the same Linears adapted as ``register_hooks`` / ``hook_fn`` of ``train_dkd_sd.py`` do
  (:class:`~wadi_core.adapters.official_hook.OfficialHookLoRaD`: a second Linear forward, W' kept for backward);
- ``full``: every parameter trainable (full fine-tuning). It computes the same weight-gradient GEMMs as LoRaD's
  dyᵀ·x and more, so it is LoRaD's floor;
- ``frozen``: the forward alone under ``torch.no_grad`` (what the frozen real score costs per call).

Each variant runs in a fresh process (``spawn``), so that its peak resident memory (``ru_maxrss``) and peak CUDA
memory are its own; per variant: median wall time over ``repeats`` passes (CUDA events on a GPU) after one untimed
pass (the one in which :func:`~.measure.saved_for_backward_bytes` counts what autograd keeps, parameters, buffers
and inputs excluded, and in which Triton compiles its kernels) and ``warmup`` more, resident memory after building
the model and its peak, and on CUDA the memory allocated after building and the peak allocated during the timed
passes. Tables: ``results/tables/benchmarks_sd15_step.*`` (CPU), ``benchmarks_gpu_sd15_step.*`` (CUDA).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..kernels import select_backend
from ..reporting import save_table
from .measure import environment_header, saved_for_backward_bytes, time_ms

VARIANTS = ("lorad", "official_hook", "full", "frozen")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Columns whose ratio to a baseline variant summarise_sd15_step reports (those present in the table).
RATIO_COLUMNS = {"time_s": "time", "saved_for_backward_GiB": "saved", "peak_rss_GiB": "peak_rss",
                 "cuda_peak_GiB": "cuda_peak"}
# The goal for our LoRaD student: at most 1.05× the fully fine-tuned step's time, and no more saved bytes.
MAX_LORAD_TIME_VS_FULL = 1.05
# A scaled-down SD1.5 U-Net (same blocks, narrow channels) for tests and --quick runs: seconds, not minutes.
QUICK_UNET_OVERRIDES = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32,
                        "attention_head_dim": 2, "sample_size": 8}
QUICK_TEXT_TOKENS = 7


def sd15_unet(overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """``UNet2DConditionModel.from_config`` of the bundled SD1.5 config (plus ``overrides``), random weights."""
    from diffusers import UNet2DConditionModel

    from ..backbones.paper import load_config

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config({**load_config("sd15"), **(overrides or {})})


def adapt(unet: nn.Module, variant: str, rank: int) -> None:
    """Prepare ``unet`` in place for ``variant`` (see the module doc)."""
    from ..adapters import inject
    from .training_step import inject_official_hook

    if variant == "lorad":
        inject(unet, "lorad", rank, "student")
    elif variant == "official_hook":
        inject_official_hook(unet, rank, "student")
    elif variant == "full":
        unet.requires_grad_(True)
    elif variant == "frozen":
        unet.requires_grad_(False)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def require_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; RuntimeError when it is CUDA and no CUDA GPU is visible."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the SD1.5 step on --device cuda needs a CUDA GPU, and torch sees none "
                           "(torch.cuda.is_available() is False); run it on the GPU machine, or on --device cpu")
    return device


def measure_variant(variant: str, rank: int = 256, text_tokens: int = 77, repeats: int = 3, threads: int = 1,
                    unet_overrides: dict | None = None, seed: int = 0, device: torch.device | str = "cpu",
                    batch_size: int = 1, autocast: str | None = None, warmup: int = 0) -> dict:
    """Time, saved-for-backward bytes and memory of one student pass of ``variant``, in this process.

    The model is built on the CPU, adapted and moved to ``device``; ``autocast`` (``"fp16"``, ``"bf16"`` or None)
    runs the forward under ``torch.autocast`` with fp32 weights. The output is taken in fp32 for backward.

    Returns a row: variant, lorad_backend (for ``lorad``: ``"triton"`` or ``"reference"``, the backend its Linears
    ran), time_s (median of ``repeats``), saved_for_backward_GiB, trainable_params, rss_after_build_GiB,
    peak_rss_GiB (``ru_maxrss`` of this process so far: meaningful in a fresh process), and on CUDA
    cuda_after_build_GiB and cuda_peak_GiB (peak allocated during the timed passes).
    """
    device = require_device(device)
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast dtype {autocast!r}; expected one of {', '.join(AUTOCAST_DTYPES)}")
    torch.set_num_threads(threads)
    unet = sd15_unet(unet_overrides, seed)
    adapt(unet, variant, rank)
    unet.to(device).train(variant != "frozen")
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    cond = torch.randn(batch_size, text_tokens, config.cross_attention_dim, generator=generator)
    t = torch.full((batch_size,), 999, dtype=torch.long)  # the student's timestep T − 1
    grad_eps = torch.randn(z.shape, generator=generator)
    z, cond, t, grad_eps = (tensor.to(device) for tensor in (z, cond, t, grad_eps))
    rss_after_build = _rss_bytes()
    cuda = device.type == "cuda"
    cuda_after_build = torch.cuda.memory_allocated(device) if cuda else None
    mixed_precision = torch.autocast(device.type, AUTOCAST_DTYPES[autocast]) if autocast else nullcontext()

    def forward() -> torch.Tensor:
        with torch.set_grad_enabled(variant != "frozen"), mixed_precision:
            return unet(z, t, encoder_hidden_states=cond).sample.float()

    def forward_backward() -> None:
        unet.zero_grad(set_to_none=True)
        eps = forward()
        if eps.requires_grad:
            eps.backward(grad_eps)

    saved = saved_for_backward_bytes(forward, [*unet.parameters(), *unet.buffers(), z, cond, t], grad_eps)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_ms({variant: forward_backward}, repeats, warmup, device)[variant] / 1e3
    row = {
        "variant": variant,
        "lorad_backend": select_backend(z) if variant == "lorad" else None,
        "time_s": seconds,
        "saved_for_backward_GiB": saved / 2**30,
        "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        "rss_after_build_GiB": rss_after_build / 2**30,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,  # KiB on Linux
    }
    if cuda:
        row["cuda_after_build_GiB"] = cuda_after_build / 2**30
        row["cuda_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run_sd15_step_benchmark(variants: tuple[str, ...] = VARIANTS, repeats: int = 3, threads: int = 1,
                            quick: bool = False, progress: bool = True, device: torch.device | str = "cpu",
                            batch_size: int = 1, autocast: str | None = None, warmup: int = 0) -> pd.DataFrame:
    """:func:`measure_variant` of every variant, each in a fresh spawned process; one row per variant.

    ``quick`` uses :data:`QUICK_UNET_OVERRIDES` and :data:`QUICK_TEXT_TOKENS` with rank 4 instead of SD1.5 at
    rank 256 and 77 tokens. ``device``, ``batch_size``, ``autocast`` and ``warmup`` go to every variant.
    """
    require_device(device)  # fail here, not in the first child
    kwargs = dict(rank=4, text_tokens=QUICK_TEXT_TOKENS, unet_overrides=QUICK_UNET_OVERRIDES) if quick else {}
    kwargs.update(device=str(device), batch_size=batch_size, autocast=autocast, warmup=warmup)
    rows = []
    for variant in tqdm(variants, desc="sd15-step", disable=not progress):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure_variant, variant, repeats=repeats, threads=threads, **kwargs).result())
    return pd.DataFrame(rows).set_index("variant")


def summarise_sd15_step(table: pd.DataFrame, baseline: str = "full") -> pd.DataFrame:
    """Each variant's time, saved bytes and peak memory (host, and CUDA where measured) relative to the
    ``baseline`` variant's (default: the fully fine-tuned step); columns ``<quantity>_vs_<baseline>``."""
    if baseline not in table.index:
        raise ValueError(f"the ratios need the {baseline!r} row; the table has {list(table.index)}")
    reference = table.loc[baseline]
    return pd.DataFrame({f"{short}_vs_{baseline}": table[column] / reference[column]
                         for column, short in RATIO_COLUMNS.items() if column in table.columns})


def table_stem(device: torch.device | str, quick: bool = False) -> str:
    """``benchmarks_sd15_step`` (CPU) or ``benchmarks_gpu_sd15_step`` (CUDA), ``_quick`` appended for quick runs."""
    stem = "benchmarks_gpu_sd15_step" if torch.device(device).type == "cuda" else "benchmarks_sd15_step"
    return f"{stem}_quick" if quick else stem


def describe_run(device: torch.device | str, threads: int, quick: bool, batch_size: int, autocast: str | None,
                 repeats: int) -> str:
    """One line saying where and how the step was measured (the tables' caption)."""
    device = torch.device(device)
    where = (f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else environment_header(threads))
    model = "scaled-down SD1.5 U-Net" if quick else "SD1.5 U-Net"
    precision = f"fp32 weights under {autocast} autocast" if autocast else "fp32"
    return f"{where}; {model}, {precision}, batch {batch_size}, median of {repeats}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks sd15-step``."""
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant, median reported")
    parser.add_argument("--warmup", type=int, default=0, help="untimed passes after the first (saved-bytes) pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (tables benchmarks_gpu_sd15_step*)")
    parser.add_argument("--batch-size", type=int, default=1, help="latents per step")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="mixed precision (default: fp32)")
    parser.add_argument("--quick", action="store_true", help="a scaled-down U-Net, for smoke tests; table *_quick")


def main(args: argparse.Namespace) -> int:
    """Run the SD1.5 step benchmark, print and save its table (with the ratios to full fine-tuning and to the
    official hook, for the rows present)."""
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
        return 2
    try:
        require_device(args.device)
    except RuntimeError as error:
        print(error)
        return 2
    header = describe_run(args.device, args.threads, args.quick, args.batch_size, args.autocast, args.repeats)
    print(header)
    table = run_sd15_step_benchmark(variants, args.repeats, args.threads, args.quick, device=args.device,
                                    batch_size=args.batch_size, autocast=args.autocast, warmup=args.warmup)
    for baseline in ("full", "official_hook"):
        if baseline in table.index:
            table = table.join(summarise_sd15_step(table, baseline))
    print(table.to_string(float_format="{:.4g}".format))
    if {"lorad", "full"} <= set(table.index):
        lorad = table.loc["lorad"]
        print(f"LoRaD vs full fine-tuning: time {lorad['time_vs_full']:.3f}× (goal ≤ {MAX_LORAD_TIME_VS_FULL}×), "
              f"saved bytes {lorad['saved_vs_full']:.3f}× (goal ≤ 1×)")
    save_table(table, table_stem(args.device, args.quick),
               caption=f"One student forward+backward of the SD1.5 U-Net ({header})")
    return 0
