"""What every benchmark measures with: the SD1.5 Linear shapes, one timer and one saved-for-backward counter.

Imports torch only (no diffusers): the kernel benchmark, which runs on machines that carry torch and triton
alone, uses it too.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor


class LinearShape(NamedTuple):
    """One adapted ``nn.Linear``: x is (batch × sequence, in_features), W is (out_features, in_features)."""

    name: str  # identifier, e.g. "attn_qkvo_320" (the kernel tables' ``shape`` column)
    layer: str  # what the Linear is, e.g. "attn"
    batch: int
    sequence: int
    out_features: int
    in_features: int

    @property
    def tokens(self) -> int:
        """Rows of x."""
        return self.batch * self.sequence

    @property
    def label(self) -> str:
        """``"GEGLU 640→5120, 2×1024 tokens"`` (square weights as ``320×320``)."""
        weight = (f"{self.in_features}×{self.out_features}" if self.in_features == self.out_features
                  else f"{self.in_features}→{self.out_features}")
        tokens = f"{self.batch}×{self.sequence}" if self.batch > 1 else f"{self.sequence}"
        return f"{self.layer} {weight}, {tokens} tokens"


# The Linears of the SD1.5 U-Net at 512×512 (64×64 latent: 4096, 1024, 256 and 64 tokens per level; 77 text
# tokens), batch 2 as under classifier-free guidance. These are the layers LoRaD adapts (WaDi §3.2; every Linear
# under down_blocks, mid_block and up_blocks, as `register_hooks` in the official `train_dkd_sd.py` selects them).
SD15_LINEAR_SHAPES: tuple[LinearShape, ...] = (
    LinearShape("attn_qkvo_320", "attn", 2, 4096, 320, 320),
    LinearShape("xattn_kv_320", "cross-attn k/v", 2, 77, 320, 768),
    LinearShape("ff_geglu_in_320", "GEGLU", 2, 4096, 2560, 320),
    LinearShape("ff_out_320", "FF out", 2, 4096, 320, 1280),
    LinearShape("attn_qkvo_640", "attn", 2, 1024, 640, 640),
    LinearShape("ff_geglu_in_640", "GEGLU", 2, 1024, 5120, 640),
    LinearShape("ff_out_640", "FF out", 2, 1024, 640, 2560),
    LinearShape("attn_qkvo_1280", "attn", 2, 256, 1280, 1280),
    LinearShape("ff_geglu_in_1280", "GEGLU", 2, 256, 10240, 1280),
    LinearShape("ff_out_1280", "FF out", 2, 256, 1280, 5120),
    LinearShape("mid_attn_qkvo_1280", "mid-block attn", 2, 64, 1280, 1280),
)
# Ragged sizes below every Triton tile and a small square: seconds, also in Triton's CPU interpreter.
QUICK_LINEAR_SHAPES: tuple[LinearShape, ...] = (
    LinearShape("quick_ragged", "ragged", 1, 37, 45, 50),
    LinearShape("quick_square", "square", 1, 64, 64, 64),
)
QUICK_RANK = 3


def sd15_shapes(names: Iterable[str]) -> tuple[LinearShape, ...]:
    """The :data:`SD15_LINEAR_SHAPES` named ``names``, in that order (ValueError naming any unknown one)."""
    by_name = {shape.name: shape for shape in SD15_LINEAR_SHAPES}
    names = list(names)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown SD1.5 shapes {unknown}; expected some of {list(by_name)}")
    return tuple(by_name[name] for name in names)


def _call_ms(call: Callable[[], object], device: torch.device) -> float:
    """Wall milliseconds of one ``call()``: CUDA events around it on a GPU, ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - start_s)


def time_ms(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
            device: torch.device | str = "cpu") -> dict[str, float]:
    """Median wall milliseconds of each call over ``repeats`` timed calls, after ``warmup`` untimed ones.

    The calls are interleaved (round 1 of every call, then round 2, ...), so a burst of load from other processes
    slows them alike and their ratios stay meaningful.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            elapsed = _call_ms(call, device)
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """:func:`time_ms` of a single call."""
    return time_ms({"call": call}, repeats, warmup, device)["call"]


def saved_for_backward_bytes(forward: Callable[[], Tensor], excluded: Iterable[Tensor] = (),
                             grad_output: Tensor | None = None) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs, each storage counted once.

    Storages of ``excluded`` (parameters, buffers, inputs: what lives in memory anyway) are not counted. Afterwards
    the graph is freed by a backward pass with ``grad_output`` (``out.sum()`` when None). Recorded with
    ``torch.autograd.graph.saved_tensors_hooks``.
    """
    skip = {tensor.untyped_storage().data_ptr() for tensor in excluded}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    if out.requires_grad:
        (out if grad_output is not None else out.sum()).backward(grad_output)
    return sum(saved.values())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment_header(threads: int | None = None) -> str:
    """torch version, thread count (``threads``, default this process's) and CPU model: what CPU timings depend
    on."""
    return f"torch {torch.__version__}, {threads or torch.get_num_threads()} threads, {cpu_model()}"
