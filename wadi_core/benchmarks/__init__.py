"""Benchmarks of LoRaD's cost, from one Linear to the SD1.5 U-Net, behind one command line::

    python -m wadi_core.benchmarks layers          # per Linear: LoRaD vs the official hook, LoRA, DoRA (make bench)
    python -m wadi_core.benchmarks kernels         # fused Triton LoRaD vs the GEMM floor (make bench-kernels)
    python -m wadi_core.benchmarks training-step   # one WaDi generator step per student, tiny world (make bench)
    python -m wadi_core.benchmarks sd15-step       # one student forward+backward of the SD1.5 U-Net (make bench)
    python -m wadi_core.benchmarks worlds          # teacher step and WaDi step in three tiny worlds (make bench)
    python -m wadi_core.benchmarks gpu-check       # kernels fp16/bf16 + the SD1.5 step on a CUDA GPU (make gpu-check)

Every subcommand takes ``--quick`` (small shapes, for smoke tests). The modules share :mod:`.measure`: the SD1.5
Linear shapes, the timer :func:`~.measure.time_ms` and the saved-for-backward counter
:func:`~.measure.saved_for_backward_bytes`. Tables go to ``results/tables/benchmarks_<name>.*``, those measured on
a GPU by ``sd15-step --device cuda`` and ``gpu-check`` to ``benchmarks_gpu_*``.

Importing this package, :mod:`.measure` or :mod:`.kernels` does not import diffusers or transformers (the GPU
machines the kernel benchmark is meant for carry torch and triton only).
"""

from .measure import (
    QUICK_LINEAR_SHAPES,
    QUICK_RANK,
    SD15_LINEAR_SHAPES,
    LinearShape,
    median_ms,
    saved_for_backward_bytes,
    sd15_shapes,
    time_ms,
)

__all__ = [
    "QUICK_LINEAR_SHAPES",
    "QUICK_RANK",
    "SD15_LINEAR_SHAPES",
    "LinearShape",
    "median_ms",
    "saved_for_backward_bytes",
    "sd15_shapes",
    "time_ms",
]
