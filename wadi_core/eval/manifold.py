"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), k-NN manifold estimate.

WaDi's Table 1 reports Precision/Recall; SwiftBrush-v2's evaluation uses the ADM/guided-diffusion
``ManifoldEstimator`` with k = 3, presumably WaDi's too (``docs/paper_notes.md#precision-and-recall``). Each set's
manifold is the union of balls centred on its features, of radius the distance to the k-th nearest neighbour in
the same set (self excluded):

    precision = fraction of generated features inside the real manifold   (fidelity)
    recall    = fraction of real features inside the generated manifold    (diversity)

Distances are computed in blocks of ``chunk`` rows × ``chunk`` columns, so memory is O(chunk²) whatever N.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(features, device: torch.device | str | None) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if x.ndim != 2:
        raise ValueError(f"features must be a (N, D) matrix, got shape {tuple(x.shape)}")
    return x.to(device=device if device is not None else x.device, dtype=torch.float32)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)); the matmul form, as ADM's evaluator (squared norms − 2ab)."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist_if_necessary")


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of ``features`` (N, D) to its k-th nearest other row (N,)."""
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < number of features, got k={k} for {n} features")
    radii = []
    for start in range(0, n, chunk):
        rows = features[start : start + chunk]
        best = torch.full((len(rows), 0), float("inf"), device=features.device)
        for col in range(0, n, chunk):
            d = _distances(rows, features[col : col + chunk])  # (r, c)
            if col == start:  # the diagonal block: a point is not its own neighbour
                d.fill_diagonal_(float("inf"))
            best = torch.cat([best, d], dim=1).topk(min(k, best.shape[1] + d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k - 1])
    return torch.cat(radii)


def _inside_manifold(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """(len(queries),) bool: query lies in some ball (centre_j, radius_j)."""
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for start in range(0, len(queries), chunk):
        rows = queries[start : start + chunk]
        hit = torch.zeros(len(rows), dtype=torch.bool, device=queries.device)
        for col in range(0, len(centres), chunk):
            hit |= (_distances(rows, centres[col : col + chunk]) <= radii[col : col + chunk]).any(dim=1)
        inside[start : start + chunk] = hit
    return inside


def precision_recall(gen_features, ref_features, k: int = 3, chunk: int = 2048,
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Improved precision and recall of generated vs reference features (Kynkäänniemi et al. 2019).

    Args:
        gen_features: (N_gen, D) features of generated images (numpy or torch), e.g. from
            :func:`~wadi_core.eval.folder_features`.
        ref_features: (N_ref, D) features of real images, same extractor.
        k: neighbourhood size of the manifold radii (3, as ADM's evaluator and SwiftBrush-v2).
        chunk: block size of the pairwise-distance computation (memory ∝ chunk²).
        device: where to compute (default: where the tensors are; CPU for numpy).

    Returns:
        ``{"precision": float, "recall": float}``, each in [0, 1].
    """
    gen, ref = _as_tensor(gen_features, device), _as_tensor(ref_features, device)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature dimensions differ: generated {gen.shape[1]}, reference {ref.shape[1]}")
    gen = gen.to(ref.device)
    ref_radii, gen_radii = knn_radii(ref, k, chunk), knn_radii(gen, k, chunk)
    precision = _inside_manifold(gen, ref, ref_radii, chunk).float().mean()
    recall = _inside_manifold(ref, gen, gen_radii, chunk).float().mean()
    return {"precision": float(precision), "recall": float(recall)}
