"""One student forward+backward of the real SD1.5 U-Net architecture, per way of training it (WaDi §3.2).

``python -m wadi_core.benchmarks sd15-step`` builds ``UNet2DConditionModel`` from the bundled SD1.5 config
(``data/model_configs/sd15_unet.json``) with random weights, fp32 on the CPU, and times the student's call of the
WaDi loop, ε̂ = G(z, 999, c), with its backward, at batch 1, a 64×64 latent and 77 text tokens of 768 dimensions,
for the variants of :data:`VARIANTS`:

- ``lorad``: our :class:`~wadi_core.adapters.LoRaDLinear` at the paper's student rank 256 on the student rule
  (:func:`wadi_core.adapters.inject`; the 182 Linears under down_blocks, mid_block, up_blocks);
- ``official_hook``: the same Linears adapted as ``register_hooks`` / ``hook_fn`` of ``train_dkd_sd.py`` do
  (:class:`~wadi_core.adapters.official_hook.OfficialHookLoRaD`: a second Linear forward, W' kept for backward);
- ``full``: every parameter trainable (full fine-tuning). It computes the same weight-gradient GEMMs as LoRaD's
  dyᵀ·x and more, so it is LoRaD's floor;
- ``frozen``: the forward alone under ``torch.no_grad`` (what the frozen real score costs per call).

Each variant runs in a fresh process (``spawn``), so that its peak resident memory (``ru_maxrss``) is its own;
per variant: median wall time over ``repeats`` passes after one untimed pass (the one in which
:func:`~.measure.saved_for_backward_bytes` counts what autograd keeps, parameters, buffers and inputs excluded),
resident memory after building the model, and the peak. Table: ``results/tables/benchmarks_sd15_step.*``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..reporting import save_table
from .measure import environment_header, saved_for_backward_bytes, time_ms

VARIANTS = ("lorad", "official_hook", "full", "frozen")
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


def measure_variant(variant: str, rank: int = 256, text_tokens: int = 77, repeats: int = 3, threads: int = 1,
                    unet_overrides: dict | None = None, seed: int = 0) -> dict:
    """Time, saved-for-backward bytes and memory of one student pass of ``variant``, in this process.

    Returns a row: variant, time_s (median of ``repeats``), saved_for_backward_GiB, trainable_params,
    rss_after_build_GiB, peak_rss_GiB (``ru_maxrss`` of this process so far: meaningful in a fresh process).
    """
    torch.set_num_threads(threads)
    unet = sd15_unet(unet_overrides, seed)
    adapt(unet, variant, rank)
    unet.train(variant != "frozen")
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    cond = torch.randn(1, text_tokens, config.cross_attention_dim, generator=generator)
    t = torch.full((1,), 999, dtype=torch.long)  # the student's timestep T − 1
    grad_eps = torch.randn(z.shape, generator=generator)
    rss_after_build = _rss_bytes()

    def forward() -> torch.Tensor:
        with torch.set_grad_enabled(variant != "frozen"):
            return unet(z, t, encoder_hidden_states=cond).sample

    def forward_backward() -> None:
        unet.zero_grad(set_to_none=True)
        eps = forward()
        if eps.requires_grad:
            eps.backward(grad_eps)

    saved = saved_for_backward_bytes(forward, [*unet.parameters(), *unet.buffers(), z, cond, t], grad_eps)
    seconds = time_ms({variant: forward_backward}, repeats, warmup=0)[variant] / 1e3
    return {
        "variant": variant,
        "time_s": seconds,
        "saved_for_backward_GiB": saved / 2**30,
        "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        "rss_after_build_GiB": rss_after_build / 2**30,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,  # KiB on Linux
    }


def run_sd15_step_benchmark(variants: tuple[str, ...] = VARIANTS, repeats: int = 3, threads: int = 1,
                            quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """:func:`measure_variant` of every variant, each in a fresh spawned process; one row per variant.

    ``quick`` uses :data:`QUICK_UNET_OVERRIDES` and :data:`QUICK_TEXT_TOKENS` with rank 4 instead of SD1.5 at
    rank 256 and 77 tokens.
    """
    kwargs = dict(rank=4, text_tokens=QUICK_TEXT_TOKENS, unet_overrides=QUICK_UNET_OVERRIDES) if quick else {}
    rows = []
    for variant in tqdm(variants, desc="sd15-step", disable=not progress):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure_variant, variant, repeats=repeats, threads=threads, **kwargs).result())
    return pd.DataFrame(rows).set_index("variant")


def summarise_sd15_step(table: pd.DataFrame) -> pd.DataFrame:
    """Each variant's time and saved bytes relative to the fully fine-tuned step (needs the ``full`` row)."""
    full = table.loc["full"]
    return pd.DataFrame({
        "time_vs_full": table["time_s"] / full["time_s"],
        "saved_vs_full": table["saved_for_backward_GiB"] / full["saved_for_backward_GiB"],
        "peak_rss_vs_full": table["peak_rss_GiB"] / full["peak_rss_GiB"],
    })


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m wadi_core.benchmarks sd15-step``."""
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant, median reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--quick", action="store_true", help="a scaled-down U-Net, for smoke tests; table *_quick")


def main(args: argparse.Namespace) -> int:
    """Run the SD1.5 step benchmark, print and save its table (with the ratios to full fine-tuning)."""
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
        return 2
    model = "scaled-down SD1.5 U-Net" if args.quick else "SD1.5 U-Net"
    header = f"{environment_header(args.threads)}; {model}, fp32, batch 1, median of {args.repeats}"
    print(header)
    table = run_sd15_step_benchmark(variants, args.repeats, args.threads, args.quick)
    if "full" in table.index:
        table = table.join(summarise_sd15_step(table))
    print(table.to_string(float_format="{:.4g}".format))
    if {"lorad", "full"} <= set(table.index):
        lorad = table.loc["lorad"]
        print(f"LoRaD vs full fine-tuning: time {lorad['time_vs_full']:.3f}× (goal ≤ {MAX_LORAD_TIME_VS_FULL}×), "
              f"saved bytes {lorad['saved_vs_full']:.3f}× (goal ≤ 1×)")
    save_table(table, "benchmarks_sd15_step_quick" if args.quick else "benchmarks_sd15_step",
               caption=f"One student forward+backward of the SD1.5 U-Net ({header})")
    return 0
