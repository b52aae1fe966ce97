"""GPU kernels for LoRaD: a fused Triton forward/backward and the dispatcher :func:`lorad_linear`. The benchmark
against the GEMM floor and the agreement checks that notebook 06 shows are in :mod:`wadi_core.benchmarks.kernels`.

Importing this package does not import triton; :mod:`.lorad_triton` (which does) is loaded on first use. The
reference (:class:`wadi_core.adapters.LoRaDFunction`) is the correctness oracle and the CPU path.

Backend choice, ``WADI_LORAD_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``:

* ``auto``: Triton for CUDA tensors (when triton imports), the reference otherwise;
* ``triton``: always Triton; on CPU tensors this works only under ``TRITON_INTERPRET=1`` (set before triton's
  kernels are defined), which is how the CPU tests run it;
* ``reference``: always :class:`~wadi_core.adapters.LoRaDFunction`.

Inference needs no kernel: a merged student (``merge``) is a plain Linear on W', so it costs exactly the
frozen UNet.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "WADI_LORAD_BACKEND"

__all__ = ["BACKENDS", "ENV_VAR", "TritonLoRaDFunction", "lorad_linear", "select_backend", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors, in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if select_backend(x) == "triton":
        from .lorad_triton import TritonLoRaDFunction as function
    else:
        from ..adapters.lorad import LoRaDFunction as function
    return function.apply(x, weight, bias, theta_a, theta_b)


def __getattr__(name: str):
    if name == "TritonLoRaDFunction":  # lazy: importing it imports triton
        from .lorad_triton import TritonLoRaDFunction

        return TritonLoRaDFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
