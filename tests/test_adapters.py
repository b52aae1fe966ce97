"""Adapters (WaDi §3.2, ``train_dkd_sd.py``): LoRaD's rotation and its custom autograd Function, the LoRA / DoRA
baselines, and the model-level inject / merge / unmerge / remove / save / load on a toy-size diffusers U-Net."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from wadi_core.adapters import (
    DoRALinear,
    LoRaDFunction,
    LoRaDLinear,
    LoRALinear,
    adapter_modules,
    count_trainable,
    inject,
    load_adapters,
    load_official_thetas,
    lorad_rotate,
    merge,
    remove,
    save_adapters,
    select_layers,
    unmerge,
)

ADAPTER_METHODS = ("lorad", "lora", "dora", "dora_frozen_norm")
ADAPTER_CLASS = {"lorad": LoRaDLinear, "lora": LoRALinear, "dora": DoRALinear, "dora_frozen_norm": DoRALinear}


def tiny_unet(cross_attention_dim: int = 8, seed: int = 0) -> UNet2DConditionModel:
    """A toy SD-style U-Net; linear projections make proj_in/proj_out Linears as in SD2.1."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
    ).eval()


def unet_inputs(cross_attention_dim: int = 8):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 3, cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), text


@torch.no_grad()
def run(model, inputs):
    sample, t, text = inputs
    return model(sample, t, encoder_hidden_states=text).sample


@torch.no_grad()
def randomize_adapters(model, seed: int = 2):
    """Move every adapter away from identity (Θ of order 1 rad, LoRA deltas of order the weights)."""
    g = torch.Generator().manual_seed(seed)
    for module in adapter_modules(model).values():
        for name, tensor in module.named_parameters():
            if not name.startswith("base_layer"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
        if isinstance(module, DoRALinear):  # frozen or not, the magnitude is the adapter's
            module.magnitude.mul_(1 + 0.2 * torch.rand(module.magnitude.shape, generator=g))


def rotate_reference(weight, theta):
    """Official hook's rotation written independently: even/odd input columns, no wrap."""
    u, v = weight[:, 0::2], weight[:, 1::2]
    out = torch.empty_like(weight)
    out[:, 0::2] = u * torch.cos(theta) - v * torch.sin(theta)
    out[:, 1::2] = u * torch.sin(theta) + v * torch.cos(theta)
    return out


def random_lorad(out=6, inp=8, r=3, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g, dtype=dtype)
    theta_a = torch.randn(out, r, generator=g, dtype=dtype) * scale
    theta_b = torch.randn(r, inp // 2, generator=g, dtype=dtype)
    return weight, theta_a, theta_b


# --- the rotation ------------------------------------------------------------------------------------------------


def test_rotation_pairs_adjacent_input_columns():
    weight, a, b = random_lorad()
    torch.testing.assert_close(lorad_rotate(weight, a, b), rotate_reference(weight, a @ b), atol=1e-5, rtol=1e-5)


def test_rotation_preserves_row_and_pair_norms():
    weight, a, b = random_lorad(out=5, inp=12, r=4, scale=2.0)
    rotated = lorad_rotate(weight, a, b)
    assert not torch.allclose(rotated, weight, atol=1e-2)
    torch.testing.assert_close(rotated.norm(dim=1), weight.norm(dim=1))
    torch.testing.assert_close(rotated.view(5, 6, 2).norm(dim=-1), weight.view(5, 6, 2).norm(dim=-1))
    assert not torch.allclose(rotated.norm(dim=0), weight.norm(dim=0), atol=1e-3)  # columns are not preserved


def test_wrap_is_a_no_op_on_values():
    weight, a, b = random_lorad(r=2)
    # Θ + 2πk through one more rank: A' = [A, 2πk], B' = [B; 1].
    a_shifted = torch.cat([a, torch.full((a.shape[0], 1), 2 * math.pi * 3)], dim=1)
    b_shifted = torch.cat([b, torch.ones(1, b.shape[1])], dim=0)
    torch.testing.assert_close(
        lorad_rotate(weight, a_shifted, b_shifted), lorad_rotate(weight, a, b), atol=1e-5, rtol=1e-5
    )


def test_rotation_keeps_the_weight_dtype_and_computes_angles_in_fp32():
    weight, a, b = random_lorad()
    rotated = lorad_rotate(weight.bfloat16(), a, b)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated, lorad_rotate(weight.bfloat16().float(), a, b).bfloat16())


# --- LoRaDFunction -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(3, 8), (2, 3, 8)])
def test_lorad_function_gradcheck(bias, x_shape):
    weight, a, b = random_lorad(dtype=torch.float64, scale=0.5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    bias_t = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    inputs = [t.requires_grad_() if t is not None else None for t in (x, weight, bias_t, a, b)]
    assert torch.autograd.gradcheck(LoRaDFunction.apply, tuple(inputs))


def test_lorad_function_matches_naive_autograd():
    weight, a, b = random_lorad(out=10, inp=16, r=4, scale=0.5)
    x = torch.randn(2, 5, 16)
    bias = torch.randn(10)
    dy = torch.randn(2, 5, 10)
    grads = []
    for forward in (LoRaDFunction.apply, lambda x, w, bias, a, b: F.linear(x, lorad_rotate(w, a, b), bias)):
        leaves = [t.clone().requires_grad_() for t in (x, bias, a, b)]
        y = forward(leaves[0], weight, leaves[1], leaves[2], leaves[3])
        y.backward(dy)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


def test_lorad_function_half_precision_grads_come_back_in_input_dtypes():
    weight, a, b = random_lorad(out=8, inp=16, r=2, scale=0.5)
    x = torch.randn(4, 16)
    leaves = [x.bfloat16().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()]
    y = LoRaDFunction.apply(leaves[0], weight.bfloat16(), None, leaves[1], leaves[2])
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]
    ref = [t.clone().requires_grad_() for t in (x, a, b)]
    F.linear(ref[0], lorad_rotate(weight, ref[1], ref[2])).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=0.1, rtol=0.05)


def _saved_bytes(forward, exclude):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        forward()
    skip = {(t.data_ptr(), t.shape) for t in exclude}
    return sum(t.numel() * t.element_size() for t in saved if (t.data_ptr(), t.shape) not in skip)


def test_lorad_function_keeps_no_out_by_in_tensor_for_backward():
    out, inp, r = 64, 96, 2
    layer = LoRaDLinear(nn.Linear(inp, out), r)
    x = torch.randn(3, inp, requires_grad=True)
    ours = _saved_bytes(lambda: layer(x), exclude=(x, layer.base_layer.weight))
    assert ours <= 4 * r * (out + inp)  # A and B in fp32
    # The naive / official-hook formulation keeps W', cos Θ and sin Θ (O(out·in)).
    naive = _saved_bytes(lambda: F.linear(x, layer.rotated_weight(), layer.base_layer.bias),
                         exclude=(x, layer.base_layer.weight))
    assert naive >= 4 * out * inp


# --- LoRaDLinear -------------------------------------------------------------------------------------------------


def test_lorad_gradients_at_init_reach_only_theta_a():
    torch.manual_seed(0)
    layer = LoRaDLinear(nn.Linear(8, 6), rank=3)
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert layer.theta_a.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.theta_b.grad) == 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_lorad_linear_odd_in_features_names_the_layer():
    with pytest.raises(ValueError, match=r"'my\.layer'.*in_features=5"):
        LoRaDLinear(nn.Linear(5, 4), rank=2, name="my.layer")


# --- model-level: rules, identity, merge ------------------------------------------------------------------------


def test_layer_rules_on_a_unet():
    model = tiny_unet()
    student, fake = select_layers(model, "student"), select_layers(model, "fake")
    assert "time_embedding.linear_1" not in student  # outside down/mid/up blocks
    assert all(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in student)
    skipped = set(student) - set(fake)
    assert skipped and all(any(s in n for s in ("proj_in", "proj_out", "time_emb_proj")) for n in skipped)
    assert {n.rsplit(".", 1)[-1] for n in skipped} == {"proj_in", "proj_out", "time_emb_proj"}
    assert set(fake) < set(student)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.parametrize("rule", ["student", "fake"])
def test_inject_adapts_the_rule_and_freezes_the_rest(method, rule):
    model = tiny_unet()
    names = inject(model, method, rank=2, rule=rule)
    assert names == select_layers(tiny_unet(), rule)
    assert all(type(model.get_submodule(n)) is ADAPTER_CLASS[method] for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[0] in names and "base_layer" not in n for n in trainable)
    assert count_trainable(model) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_inject_full_makes_everything_trainable():
    model = tiny_unet()
    model.requires_grad_(False)
    assert inject(model, "full", rank=0) == []
    assert count_trainable(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ADAPTER_METHODS + ("full",))
def test_identity_at_init(method):
    inputs = unet_inputs()
    model = tiny_unet()
    before = run(model, inputs)
    inject(model, method, rank=2)
    torch.testing.assert_close(run(model, inputs), before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merge_matches_adapted_forward_and_unmerge_restores_weights(method):
    inputs = unet_inputs()
    model = tiny_unet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, method, rank=2)
    randomize_adapters(model)
    adapted = run(model, inputs)
    assert not torch.allclose(adapted, run(tiny_unet(), inputs), atol=1e-3)
    assert merge(model, remove=False)
    torch.testing.assert_close(run(model, inputs), adapted, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(run(model, inputs), adapted, atol=1e-5, rtol=1e-5)
    for name in adapter_modules(model):
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight, original[f"{name}.weight"],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merged_state_dict_loads_strictly_into_a_vanilla_unet(method):
    inputs = unet_inputs()
    model = tiny_unet()
    inject(model, method, rank=2, rule="fake")
    randomize_adapters(model)
    adapted = run(model, inputs)
    merge(model)
    assert not adapter_modules(model)
    vanilla = tiny_unet(seed=7)
    vanilla.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(run(vanilla, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_dora_frozen_norm_keeps_the_teachers_row_norms():
    linear = nn.Linear(8, 6)
    teacher_norms = linear.weight.detach().norm(dim=1).clone()
    layer = DoRALinear(linear, rank=2, frozen_norm=True)
    assert "magnitude" not in dict(layer.named_parameters()) and "magnitude" in dict(layer.named_buffers())
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.norm(dim=1), teacher_norms)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_double_merge_warns_and_is_a_no_op(method):
    model = tiny_unet()
    inject(model, method, rank=2)
    randomize_adapters(model)
    layer = next(iter(adapter_modules(model).values()))
    layer.merge()
    merged = layer.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_safe_merge_raises_on_non_finite_weights(method):
    model = tiny_unet()
    inject(model, method, rank=2)
    name, layer = next(iter(adapter_modules(model).items()))
    with torch.no_grad():  # theta_a / lora_A = inf: the merged weight is inf or nan (inf·0)
        next(p for n, p in layer.named_parameters() if "base_layer" not in n).fill_(float("inf"))
    with pytest.raises(ValueError, match=rf"{name}: .*non-finite"):
        merge(model, safe_merge=True)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_remove_restores_plain_linears_with_original_weights(method):
    model = tiny_unet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, method, rank=2)
    randomize_adapters(model)
    merge(model, remove=False)
    remove(model)
    assert not adapter_modules(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)


# --- save / load / official thetas ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_save_load_round_trip(method, tmp_path):
    inputs = unet_inputs()
    model = tiny_unet()
    inject(model, method, rank=2, rule="fake")
    randomize_adapters(model)
    save_adapters(model, tmp_path / "adapters.safetensors")
    restored = tiny_unet()
    inject(restored, method, rank=2, rule="fake")
    load_adapters(restored, tmp_path / "adapters.safetensors")
    torch.testing.assert_close(run(restored, inputs), run(model, inputs))


def test_load_adapters_rejects_other_metadata(tmp_path):
    model = tiny_unet()
    inject(model, "lorad", rank=2)
    save_adapters(model, tmp_path / "a.safetensors")
    other = tiny_unet()
    inject(other, "lorad", rank=4)
    with pytest.raises(ValueError, match="rank: file 2 vs model 4"):
        load_adapters(other, tmp_path / "a.safetensors")


def test_official_thetas_reproduce_the_official_hooked_forward():
    inputs = unet_inputs()
    # The official code: a forward hook on each vanilla Linear recomputes the output with the rotated weight.
    official = tiny_unet()
    g = torch.Generator().manual_seed(3)
    for name in select_layers(official, "student"):
        layer = official.get_submodule(name)
        layer.theta_a = nn.Parameter(torch.randn(layer.out_features, 2, generator=g) * 0.5)
        layer.theta_b = nn.Parameter(torch.randn(2, layer.in_features // 2, generator=g))
        layer.register_forward_hook(
            lambda m, args, out: F.linear(args[0], rotate_reference(m.weight, m.theta_a @ m.theta_b), m.bias))
    state = {k: v for k, v in official.state_dict().items() if k.endswith((".theta_a", ".theta_b"))}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.theta_a" in state
    ours = tiny_unet()
    inject(ours, "lorad", rank=2)
    load_official_thetas(ours, state)
    torch.testing.assert_close(run(ours, inputs), run(official, inputs), atol=1e-5, rtol=1e-5)
    state.pop("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.theta_a")
    state["up_blocks.9.nonexistent.theta_a"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing down_blocks\.1\..*to_q\.theta_a.*unknown up_blocks\.9"):
        load_official_thetas(ours, state)


# --- errors at the boundary -------------------------------------------------------------------------------------


def test_odd_in_features_error_names_the_layer():
    model = tiny_unet(cross_attention_dim=7)
    with pytest.raises(ValueError, match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k'.*odd"):
        inject(model, "lorad", rank=2)
    assert inject(model, "lora", rank=2)  # additive adapters do not pair columns


@pytest.mark.parametrize("kwargs, allowed", [
    (dict(method="loha", rank=2), "lorad, lora, dora, dora_frozen_norm, full"),
    (dict(method="lorad", rank=2, rule="teacher"), "student, fake"),
])
def test_unknown_method_or_rule_lists_the_allowed_values(kwargs, allowed):
    with pytest.raises(ValueError, match=allowed):
        inject(tiny_unet(), **kwargs)


def test_inject_twice_is_refused():
    model = tiny_unet()
    inject(model, "lorad", rank=2)
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, "lora", rank=2)
