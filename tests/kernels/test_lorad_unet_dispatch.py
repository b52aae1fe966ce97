"""LoRaDLinear inside a model goes through the dispatcher: a tiny diffusers U-Net with LoRaD injected gives the same
output and θ gradients with ``WADI_LORAD_BACKEND=reference`` and ``=triton`` (Triton's CPU interpreter, fp32), and
``auto`` on CPU tensors runs the reference. Shapes are tiny: every adapted Linear runs three interpreted kernels.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest.py sets it
    pytest.skip("needs TRITON_INTERPRET=1 before triton kernels are defined", allow_module_level=True)

from diffusers import UNet2DConditionModel  # noqa: E402

import wadi_core.kernels as kernels  # noqa: E402
from wadi_core.adapters import LoRaDLinear, inject  # noqa: E402

CHANNELS, SIZE, TOKENS, TEXT_DIM, BATCH = 4, 4, 3, 8, 2
TOL = 1e-4  # fp32: max |triton − reference| / max |reference|, per tensor
LORAD_NODES = {"reference": "LoRaDFunctionBackward", "triton": "TritonLoRaDFunctionBackward"}


def tiny_lorad_unet() -> UNet2DConditionModel:
    """One cross-attention level (down and up), no mid block; LoRaD rank 2 with A drawn away from 0 (Θ ≠ 0)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4,
    )
    inject(unet, "lorad", rank=2)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, LoRaDLinear):
                module.theta_a.normal_(std=0.7)
    return unet


@pytest.fixture(scope="module")
def unet():
    return tiny_lorad_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g), torch.tensor([999, 10]),
            torch.randn(BATCH, TOKENS, TEXT_DIM, generator=g), torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g))


def lorad_layers(unet) -> dict[str, LoRaDLinear]:
    return {name: module for name, module in unet.named_modules() if isinstance(module, LoRaDLinear)}


def backward_node_names(output: torch.Tensor) -> Counter:
    """How often each autograd node class appears in the graph behind ``output``."""
    seen, stack, names = set(), [output.grad_fn], Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def forward_backward(unet, inputs) -> tuple[torch.Tensor, Counter, dict[str, torch.Tensor]]:
    z, t, cond, grad_out = inputs
    unet.zero_grad(set_to_none=True)
    out = unet(z, t, encoder_hidden_states=cond).sample
    nodes = backward_node_names(out)
    out.backward(grad_out)
    grads = {f"{name}.{theta}": getattr(layer, theta).grad.clone()
             for name, layer in lorad_layers(unet).items() for theta in ("theta_a", "theta_b")}
    return out.detach(), nodes, grads


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def test_triton_and_reference_backends_agree_inside_the_unet(unet, inputs, monkeypatch):
    layers = lorad_layers(unet)
    assert len(layers) >= 10  # attention q/k/v/out, cross-attention, feed-forward and time projections
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, backend)
        runs[backend] = forward_backward(unet, inputs)
        out, nodes, _ = runs[backend]
        assert nodes[LORAD_NODES[backend]] == len(layers), (backend, nodes)  # every adapted Linear, this backend
        other = LORAD_NODES["triton" if backend == "reference" else "reference"]
        assert nodes[other] == 0, (backend, nodes)
    (ref_out, _, ref_grads), (tri_out, _, tri_grads) = runs["reference"], runs["triton"]
    assert rel(tri_out, ref_out) < TOL
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) == 2 * len(layers)
    for name, want in ref_grads.items():
        assert want.abs().max() > 0, name  # θ ≠ 0: every gradient is exercised
        assert rel(tri_grads[name], want) < TOL, (name, rel(tri_grads[name], want))


def test_auto_runs_the_reference_on_cpu_tensors(unet, inputs, monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    chosen = []
    real_select = kernels.select_backend
    monkeypatch.setattr(kernels, "select_backend", lambda x: chosen.append(real_select(x)) or chosen[-1])
    z, t, cond, _ = inputs
    out = unet(z, t, encoder_hidden_states=cond).sample
    assert chosen == ["reference"] * len(lorad_layers(unet))
    assert backward_node_names(out)[LORAD_NODES["reference"]] == len(chosen)


def test_triton_path_takes_the_autocast_dtype(monkeypatch):
    """Under autocast x enters the kernels in the autocast dtype, as the reference's F.linear casts it."""
    torch.manual_seed(0)
    layer = LoRaDLinear(torch.nn.Linear(32, 16), rank=2)
    with torch.no_grad():
        layer.theta_a.normal_(std=0.7)
    x = torch.randn(5, 32)
    outputs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, backend)
        with torch.autocast("cpu", dtype=torch.float16):
            outputs[backend] = layer(x)
    assert outputs["triton"].dtype == outputs["reference"].dtype == torch.float16
    assert rel(outputs["triton"].float(), outputs["reference"].float()) < 1e-2
