"""The fused Triton LoRaD Linear against the reference ``LoRaDFunction``, on CPU in Triton's interpreter.

Tolerances (max |error| / max |reference|): fp32 1e-4, fp16 1e-2 (the reference rounds W' and dyᵀ·x to fp16,
the kernels keep them in fp32). bf16 runs only on a GPU (the interpreter's bf16 is broken), see
``python -m wadi_core.benchmarks kernels``. Shapes are tiny: the interpreter runs a 256³ matmul in about a second.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest.py sets it
    pytest.skip("needs TRITON_INTERPRET=1 before triton kernels are defined", allow_module_level=True)

from wadi_core.adapters import LoRaDFunction, lorad_rotate  # noqa: E402
from wadi_core.kernels import ENV_VAR, lorad_linear, select_backend  # noqa: E402
from wadi_core.kernels.lorad_triton import TritonLoRaDFunction  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}

# (leading dims of x, out, in, r, forced tile sizes)
CASES = {
    "ragged": ((37,), 45, 50, 3, None),
    "rank1": ((19,), 20, 34, 1, None),
    "r_gt_block": ((16,), 32, 64, 20, {"BLOCK_R": 16}),  # Θ accumulated over two rank chunks
    "batched_multi_tile": ((2, 21), 40, 72, 5, None),  # 3-D x, several tiles along every axis
}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def _make(lead, out_f, in_f, rank, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    weight = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    theta_a = torch.randn(out_f, rank, generator=g) * 0.7  # Θ well away from 0 and beyond ±π
    theta_b = torch.randn(rank, in_f // 2, generator=g) * 0.7
    dy = torch.randn(*lead, out_f, generator=g).to(dtype)
    return x, weight, b, theta_a, theta_b, dy


def _run(function, x, weight, b, theta_a, theta_b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, b, theta_a, theta_b)]
    xl, bl, al, bbl = leaves
    y = function.apply(xl, weight, bl, al, bbl)
    y.backward(dy)
    out = {"y": y.detach(), "dx": xl.grad, "dA": al.grad, "dB": bbl.grad}
    if bl is not None:
        out["db"] = bl.grad
    return out


@pytest.fixture
def blocks():
    def set_blocks(value):
        TritonLoRaDFunction.blocks = value

    yield set_blocks
    TritonLoRaDFunction.blocks = None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_function(case, dtype, bias, blocks):
    lead, out_f, in_f, rank, tiles = CASES[case]
    blocks(tiles)
    tensors = _make(lead, out_f, in_f, rank, dtype, bias)
    got = _run(TritonLoRaDFunction, *tensors)
    want = _run(LoRaDFunction, *tensors)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert _rel(got[name], want[name]) < TOL[dtype], (name, _rel(got[name], want[name]))


def test_matches_plain_autograd_fp32():
    """Second oracle: autograd straight through ``lorad_rotate`` and ``F.linear``."""
    x, weight, b, theta_a, theta_b, dy = _make((13,), 24, 40, 4, torch.float32, True, seed=1)
    got = _run(TritonLoRaDFunction, x, weight, b, theta_a, theta_b, dy)
    xl, bl, al, bbl = (t.clone().requires_grad_() for t in (x, b, theta_a, theta_b))
    y = torch.nn.functional.linear(xl, lorad_rotate(weight, al, bbl), bl)
    y.backward(dy)
    for name, want in {"y": y.detach(), "dx": xl.grad, "db": bl.grad, "dA": al.grad, "dB": bbl.grad}.items():
        assert _rel(got[name], want) < 1e-4, name


def test_identity_at_init():
    """A = 0 (LoRaD's init): the kernel is a plain Linear."""
    x, weight, b, _, theta_b, _ = _make((9,), 18, 32, 2, torch.float32, True)
    y = TritonLoRaDFunction.apply(x, weight, b, torch.zeros(18, 2), theta_b)
    assert _rel(y, torch.nn.functional.linear(x, weight, b)) < 1e-5


def test_odd_in_features_raises():
    with pytest.raises(ValueError, match="even"):
        TritonLoRaDFunction.apply(torch.randn(4, 9), torch.randn(6, 9), None, torch.zeros(6, 1), torch.zeros(1, 4))


def test_dispatch_default_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend(torch.zeros(1)) == "reference"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert select_backend(torch.zeros(1)) == "reference"


def test_dispatch_env_switch(monkeypatch):
    x, weight, b, theta_a, theta_b, _ = _make((5,), 16, 32, 2, torch.float32, True)
    want = LoRaDFunction.apply(x, weight, b, theta_a, theta_b)
    for backend, grad_fn in (("triton", "TritonLoRaDFunction"), ("reference", "LoRaDFunction")):
        monkeypatch.setenv(ENV_VAR, backend)
        assert select_backend(x) == backend
        y = lorad_linear(x, weight, b, theta_a.requires_grad_(), theta_b)
        assert type(y.grad_fn).__name__.startswith(grad_fn), type(y.grad_fn).__name__
        assert _rel(y, want) < 1e-4
    monkeypatch.setenv(ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=ENV_VAR):
        select_backend(x)


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(torch.zeros(1))
