"""Weight-change analysis (WaDi Fig. 1(a)–(c)): synthetic teacher/student pairs with known answers —
a per-row rescale changes only norms, a rotation of input pairs only directions, a partial rotation leaves a
low-rank direction residual, and the norm / direction swaps undo them."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wadi_core.analysis import (
    CHANGE_COLUMNS,
    ENERGY_COLUMNS,
    cumulative_energy,
    direction_residual,
    rank_k,
    residual_energy,
    row_changes,
    select_weights,
    summarize_changes,
    swap,
    weight_changes,
)

PHI = 0.3  # rotation angle of every input pair (radians)


def pair_rotation(in_features: int, phi: float, planes: int | None = None) -> torch.Tensor:
    """Q (in × in) such that w·Q rotates each input pair (2j, 2j+1) of a row w by phi; only the first ``planes``
    pairs when given (then Q − I has rank 2·planes). Every row keeps its norm and, with all pairs rotated,
    cos(w, w·Q) = cos(phi) exactly."""
    q = torch.eye(in_features, dtype=torch.float64)
    c, s = math.cos(phi), math.sin(phi)
    for j in range(in_features // 2 if planes is None else planes):
        q[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    return q


def rotate_rows(weight: torch.Tensor, phi: float, planes: int | None = None) -> torch.Tensor:
    """weight viewed as (out, in·k·k), each row rotated by :func:`pair_rotation`, back to its shape and dtype."""
    matrix = weight.double().reshape(weight.shape[0], -1)
    return (matrix @ pair_rotation(matrix.shape[1], phi, planes)).reshape(weight.shape).to(weight.dtype)


def make_teacher(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny UNet-like state dict: attention and plain Linear weights, a conv, a bias, a norm and a buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "attn1.to_q.weight": torch.randn(6, 8, generator=g),
        "attn1.to_q.bias": torch.randn(6, generator=g),
        "ff.proj.weight": torch.randn(10, 4, generator=g),
        "norm.weight": torch.rand(8, generator=g) + 0.5,
        "conv.weight": torch.randn(5, 2, 3, 3, generator=g),
        "step": torch.tensor(3),
    }


def rescale_student(
    teacher: dict[str, torch.Tensor], seed: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Student = teacher with every layer row i multiplied by a known positive factor s_i; other tensors perturbed."""
    g = torch.Generator().manual_seed(seed)
    student, scales = {}, {}
    for name, tensor in teacher.items():
        if tensor.dim() >= 2:
            scales[name] = 0.5 + torch.rand(tensor.shape[0], generator=g, dtype=torch.float64)
            student[name] = (tensor.double() * scales[name].view(-1, *[1] * (tensor.dim() - 1))).to(tensor.dtype)
        else:
            student[name] = tensor + 1
    return student, scales


def rotate_student(teacher: dict[str, torch.Tensor], phi: float = PHI) -> dict[str, torch.Tensor]:
    return {name: rotate_rows(t, phi) if t.dim() >= 2 else t + 1 for name, t in teacher.items()}


# ---------------------------------------------------------------------------------------------------------------
# Layer selection and table layout.
# ---------------------------------------------------------------------------------------------------------------


def test_layers_are_the_2d_and_4d_weights_with_kinds_and_shapes():
    teacher = make_teacher()
    df = weight_changes(teacher, teacher, progress=False)
    assert list(df.columns) == list(CHANGE_COLUMNS)
    assert df["layer"].tolist() == ["attn1.to_q.weight", "ff.proj.weight", "conv.weight"]
    assert df["kind"].tolist() == ["attention", "linear", "conv"]
    assert df["shape"].tolist() == ["6×8", "10×4", "5×2×3×3"]
    assert df["out"].tolist() == [6, 10, 5] and df["in"].tolist() == [8, 4, 18]
    assert df["numel"].tolist() == [48, 40, 90]
    stats = df[["norm_mean", "norm_std", "direction_mean", "direction_std"]].to_numpy()
    np.testing.assert_allclose(stats, 0.0, atol=1e-12)


def test_layers_filter_by_names_or_callable():
    teacher = make_teacher()
    assert select_weights(teacher, ["conv.weight"]) == ["conv.weight"]
    assert select_weights(teacher, "conv.weight") == ["conv.weight"]
    assert select_weights(teacher, lambda name: "attn" in name) == ["attn1.to_q.weight"]
    df = weight_changes(teacher, teacher, layers=lambda name: name.startswith("ff"), progress=False)
    assert df["layer"].tolist() == ["ff.proj.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        select_weights(teacher, ["norm.weight"])  # 1-D: not a layer


# ---------------------------------------------------------------------------------------------------------------
# Fig. 1(a): norm and direction change.
# ---------------------------------------------------------------------------------------------------------------


def test_pure_rescale_changes_only_the_norm():
    teacher = make_teacher()
    student, scales = rescale_student(teacher)
    df = weight_changes(teacher, student, progress=False).set_index("layer")
    for name, s in scales.items():
        expected = (s - 1).abs().numpy()
        # float32 weights: the student is the rescale rounded to float32, hence atol 1e-6
        assert df.loc[name, "norm_mean"] == pytest.approx(expected.mean(), abs=1e-6)
        assert df.loc[name, "norm_std"] == pytest.approx(expected.std(), abs=1e-6)
        assert df.loc[name, "direction_mean"] == pytest.approx(0.0, abs=1e-7)
        norm_change, direction_change = row_changes(teacher[name], student[name])
        np.testing.assert_allclose(norm_change.numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(direction_change.numpy(), 0.0, atol=1e-7)


def test_pure_rotation_changes_only_the_direction_by_a_known_amount():
    teacher = {name: t.double() for name, t in make_teacher().items()}
    student = rotate_student(teacher)
    df = weight_changes(teacher, student, progress=False)
    np.testing.assert_allclose(df["norm_mean"], 0.0, atol=1e-12)
    np.testing.assert_allclose(df["norm_std"], 0.0, atol=1e-12)
    np.testing.assert_allclose(df["direction_mean"], 1 - math.cos(PHI), rtol=1e-10)
    np.testing.assert_allclose(df["direction_std"], 0.0, atol=1e-12)
    angles = weight_changes(teacher, student, angle=True, progress=False)
    np.testing.assert_allclose(angles["direction_mean"], PHI, rtol=1e-8)


def test_angle_option_is_the_arccos_of_the_cosine():
    g = torch.Generator().manual_seed(2)
    w_t, w_s = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    _, one_minus_cos = row_changes(w_t, w_s)
    _, angle = row_changes(w_t, w_s, angle=True)
    cos = torch.nn.functional.cosine_similarity(w_t.double(), w_s.double(), dim=1)
    torch.testing.assert_close(one_minus_cos, 1 - cos)
    torch.testing.assert_close(angle, torch.arccos(1 - one_minus_cos))


def test_conv_weights_are_analysed_as_out_by_in_k_k():
    conv = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rotated = rotate_rows(conv, PHI)
    df = weight_changes({"c.weight": conv}, {"c.weight": rotated}, progress=False)
    assert (df.loc[0, "kind"], df.loc[0, "out"], df.loc[0, "in"]) == ("conv", 4, 18)
    assert df.loc[0, "direction_mean"] == pytest.approx(1 - math.cos(PHI), rel=1e-10)
    energy = residual_energy({"c.weight": conv}, {"c.weight": rotated}, rank_fraction=1.0, progress=False)
    assert (energy.loc[0, "min_dim"], energy.loc[0, "k"]) == (4, 4)
    assert energy.loc[0, "energy"] == pytest.approx(1.0)


def test_zero_teacher_rows_are_left_out_of_the_statistics():
    w_t = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w_t[1] = 0
    w_s = 1.5 * w_t
    w_s[1] = 1.0  # any change of a zero teacher row is ignored
    norm_change, direction_change = row_changes(w_t, w_s)
    assert norm_change.shape == (3,)
    torch.testing.assert_close(norm_change, torch.full((3,), 0.5, dtype=torch.float64))
    df = weight_changes({"w.weight": w_t}, {"w.weight": w_s}, progress=False)
    assert df.loc[0, "norm_mean"] == pytest.approx(0.5) and df.loc[0, "norm_std"] == pytest.approx(0.0, abs=1e-12)
    all_zero = weight_changes({"w.weight": torch.zeros(2, 3)}, {"w.weight": torch.ones(2, 3)}, progress=False)
    assert all_zero[["norm_mean", "direction_mean"]].isna().all(axis=None)


def test_summarize_changes_means_and_ratios():
    df = pd.DataFrame({"norm_mean": [0.001, 0.003], "norm_std": [0.002, 0.002],
                       "direction_mean": [0.02, 0.06], "direction_std": [0.01, 0.03]})
    summary = summarize_changes(df)
    assert summary["n_layers"] == 2
    assert summary["norm_mean"] == pytest.approx(0.002) and summary["direction_mean"] == pytest.approx(0.04)
    assert summary["ratio_mean"] == pytest.approx(20.0) and summary["ratio_std"] == pytest.approx(10.0)
    assert math.isinf(summarize_changes(df.assign(norm_mean=0.0))["ratio_mean"])
    with pytest.raises(ValueError, match="norm_std"):
        summarize_changes(df.drop(columns="norm_std"))


# ---------------------------------------------------------------------------------------------------------------
# Fig. 1(b): top-k energy of the direction residual.
# ---------------------------------------------------------------------------------------------------------------


def test_rank_k_follows_the_fig_1b_x_values():
    assert [rank_k(0.3, n) for n in (4, 36, 320, 640, 768, 1280)] == [1, 10, 96, 192, 230, 384]
    assert rank_k(0.3, 10) == 3 and rank_k(0.01, 5) == 1 and rank_k(1.0, 7) == 7
    with pytest.raises(ValueError, match="rank_fraction"):
        rank_k(0.0, 10)


def test_rank_k_direction_residual_has_all_its_energy_in_k():
    g = torch.Generator().manual_seed(5)
    w_t = torch.randn(12, 20, generator=g, dtype=torch.float64)
    w_t = w_t * (0.5 + torch.rand(12, 1, generator=g, dtype=torch.float64))
    rescale = 0.5 + torch.rand(12, 1, generator=g, dtype=torch.float64)
    w_s = rescale * rotate_rows(w_t, PHI, planes=2)  # residual = Ŵ_t (Q − I): rank 4; the rescale is normalised away
    residual = direction_residual(w_t, w_s)
    assert torch.linalg.matrix_rank(residual).item() == 4
    df = residual_energy({"w.weight": w_t}, {"w.weight": w_s}, rank_fraction=4 / 12, progress=False)
    assert list(df.columns) == list(ENERGY_COLUMNS)
    assert (df.loc[0, "k"], df.loc[0, "min_dim"]) == (4, 12)
    assert df.loc[0, "energy"] == pytest.approx(1.0, abs=1e-12)
    below = residual_energy({"w.weight": w_t}, {"w.weight": w_s}, rank_fraction=1 / 12, progress=False)
    assert below.loc[0, "k"] == 1 and below.loc[0, "energy"] < 1.0


def test_residual_energy_matches_a_numpy_reference():
    g = torch.Generator().manual_seed(6)
    w_t, w_s = torch.randn(9, 15, generator=g), torch.randn(9, 15, generator=g)
    r = w_s.double().numpy() / np.linalg.norm(w_s.double().numpy(), axis=1, keepdims=True)
    r -= w_t.double().numpy() / np.linalg.norm(w_t.double().numpy(), axis=1, keepdims=True)
    sigma = np.linalg.svd(r, compute_uv=False)
    k = rank_k(0.3, 9)
    for use_sigma, power in ((False, 2), (True, 1)):
        df = residual_energy({"w.weight": w_t}, {"w.weight": w_s}, use_sigma=use_sigma, progress=False)
        assert df.loc[0, "energy"] == pytest.approx((sigma[:k] ** power).sum() / (sigma**power).sum(), rel=1e-10)


def test_zero_residual_has_nan_energy():
    teacher = make_teacher()
    doubled = {name: 2 * t for name, t in teacher.items()}  # a power-of-two rescale normalises away exactly
    for student in (teacher, doubled):
        df = residual_energy(teacher, student, progress=False)
        assert len(df) == 3 and df["energy"].isna().all()
    assert math.isnan(cumulative_energy(torch.zeros(3, 4), k=1))


# ---------------------------------------------------------------------------------------------------------------
# Fig. 1(c): swapping the norm or the direction.
# ---------------------------------------------------------------------------------------------------------------


def test_swap_norm_undoes_a_rescale_and_swap_direction_undoes_a_rotation():
    teacher = make_teacher()
    rescaled, _ = rescale_student(teacher)
    rotated = rotate_student(teacher)
    for student, take in ((rescaled, "norm"), (rotated, "direction")):
        before_t = {n: t.clone() for n, t in teacher.items()}
        before_s = {n: t.clone() for n, t in student.items()}
        out = swap(teacher, student, take=take, progress=False)
        assert list(out) == list(student)
        for name in ("attn1.to_q.weight", "ff.proj.weight", "conv.weight"):
            torch.testing.assert_close(out[name], teacher[name], rtol=1e-5, atol=1e-6)
            assert out[name].dtype == student[name].dtype
        for name in ("attn1.to_q.bias", "norm.weight", "step"):  # everything else is the student's, cloned
            assert torch.equal(out[name], student[name]) and out[name].data_ptr() != student[name].data_ptr()
        for name in teacher:  # inputs unchanged
            assert torch.equal(teacher[name], before_t[name]) and torch.equal(student[name], before_s[name])


def test_swap_takes_one_component_from_each_side():
    g = torch.Generator().manual_seed(7)
    w_t, w_s = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    norm_t, norm_s = w_t.norm(dim=1, keepdim=True), w_s.norm(dim=1, keepdim=True)
    out_norm = swap({"w.weight": w_t}, {"w.weight": w_s}, take="norm", progress=False)["w.weight"]
    out_direction = swap({"w.weight": w_t}, {"w.weight": w_s}, take="direction", progress=False)["w.weight"]
    torch.testing.assert_close(out_norm, norm_t * w_s / norm_s)
    torch.testing.assert_close(out_direction, norm_s * w_t / norm_t)
    only_conv = swap(
        make_teacher(), rotate_student(make_teacher()), take="direction", layers=["conv.weight"], progress=False
    )
    assert not torch.allclose(only_conv["ff.proj.weight"], make_teacher()["ff.proj.weight"])
    with pytest.raises(ValueError, match="take"):
        swap({"w.weight": w_t}, {"w.weight": w_s}, take="magnitude", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: mismatches and nn.Modules.
# ---------------------------------------------------------------------------------------------------------------


def test_mismatched_keys_or_shapes_raise_naming_them():
    teacher = make_teacher()
    extra = {**teacher, "extra.weight": torch.ones(2, 2)}
    for call in (weight_changes, residual_energy, swap):
        with pytest.raises(ValueError, match="only in student: 'extra.weight'"):
            call(teacher, extra, progress=False)
    missing = {n: t for n, t in teacher.items() if n != "ff.proj.weight"}
    with pytest.raises(ValueError, match="only in teacher: 'ff.proj.weight'"):
        weight_changes(teacher, missing, progress=False)
    reshaped = {**teacher, "ff.proj.weight": torch.ones(4, 10)}
    with pytest.raises(ValueError, match=r"'ff.proj.weight' \(10, 4\) vs \(4, 10\)"):
        weight_changes(teacher, reshaped, progress=False)
    with pytest.raises(ValueError, match="nn.Module"):
        weight_changes([1, 2], teacher, progress=False)


def test_nn_module_inputs():
    torch.manual_seed(8)
    teacher = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(2, 4, 3))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.copy_(rotate_rows(student[0].weight, PHI))
        student[1].weight.mul_(2.0)
    df = weight_changes(teacher, student, progress=False)
    assert df["layer"].tolist() == ["0.weight", "1.weight"] and df["kind"].tolist() == ["linear", "conv"]
    assert df.loc[0, "direction_mean"] == pytest.approx(1 - math.cos(PHI), rel=1e-5)
    assert df.loc[1, "norm_mean"] == pytest.approx(1.0) and df.loc[1, "direction_mean"] == pytest.approx(0.0, abs=1e-7)
    restored = copy.deepcopy(student)
    direction_swapped = swap(teacher, student, take="direction", progress=False)
    restored.load_state_dict(swap(teacher, direction_swapped, take="norm", progress=False))
    for mine, theirs in zip(restored.parameters(), teacher.parameters()):
        if mine.dim() >= 2:
            torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(restored[0].bias, student[0].bias)
    assert len(residual_energy(teacher, student, progress=False)) == 2
