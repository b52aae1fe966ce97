"""LoRaD's Linear: the reference math (:mod:`.reference`), a fused Triton forward/backward (:mod:`.lorad_triton`)
and the dispatcher :func:`lorad_linear` that every unmerged :class:`wadi_core.adapters.LoRaDLinear` calls
(WaDi §3.2). The benchmark against the GEMM floor and the agreement checks that notebook 06 shows are in
:mod:`wadi_core.benchmarks.kernels`.

Importing this package imports torch only; :mod:`.lorad_triton` (which imports triton) is loaded on first use.
The reference (:class:`LoRaDFunction`, also exported as :class:`wadi_core.adapters.LoRaDFunction`) is the
correctness oracle and the CPU path.

Backend choice, ``WADI_LORAD_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``:

* ``auto``: Triton for CUDA tensors (when triton imports), the reference otherwise;
* ``triton``: always Triton; on CPU tensors this works only under ``TRITON_INTERPRET=1`` (set before triton's
  kernels are defined), which is how the CPU tests run it;
* ``reference``: always :class:`LoRaDFunction`.

Under autocast the Triton path takes x in the autocast dtype (as ``F.linear`` inside the reference would), so
an fp16-autocast model runs the fp16 kernels. Inference needs no kernel: a merged student (``merge``) is a plain
Linear on W', so it costs exactly the frozen U-Net.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .reference import LoRaDFunction, lorad_rotate

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "WADI_LORAD_BACKEND"

__all__ = ["BACKENDS", "ENV_VAR", "LoRaDFunction", "TritonLoRaDFunction", "lorad_linear", "lorad_rotate",
           "select_backend", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors, in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for input ``x``, following ``WADI_LORAD_BACKEND`` (see the module doc)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r}; expected one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not _triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        if x.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton on a {x.device.type} tensor needs Triton's CPU interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (slow; meant for tests), or use CUDA tensors"
            )
        return "triton"
    return "triton" if x.device.type == "cuda" and _triton_available() else "reference"


def lorad_linear(x, weight, bias, theta_a, theta_b):
    """y = x·W'ᵀ + b with W' = rot(W, A·B), by the backend :func:`select_backend` picks (autograd-aware)."""
    if select_backend(x) == "reference":
        return LoRaDFunction.apply(x, weight, bias, theta_a, theta_b)
    from .lorad_triton import TritonLoRaDFunction

    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))  # the reference's F.linear autocasts; the kernels do not
    return TritonLoRaDFunction.apply(x, weight, bias, theta_a, theta_b)


def __getattr__(name: str):
    if name == "TritonLoRaDFunction":  # lazy: importing it imports triton
        from .lorad_triton import TritonLoRaDFunction

        return TritonLoRaDFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
