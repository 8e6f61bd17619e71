"""TwoNN intrinsic dimension (Facco et al., Sci. Rep. 2017), as GeLoRA uses it (pure, no collectives).

For each point, μ = r₂/r₁, the ratio of its second to its first nearest-neighbour distance. On a
d-dimensional manifold with locally uniform density μ is Pareto(d): P(μ > x) = x^(-d). Two estimates:
- ``mle``: d = N / Σ log μ_i;
- ``fit``: the empirical CDF F of μ, then −log(1 − F(μ)) = d·log μ fitted through the origin by least
  squares, after dropping the largest ``discard_fraction`` of μ (their CDF values are unreliable).
Points with a zero first-neighbour distance (duplicates) have no defined μ and are dropped; the
result says how many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TwoNNResult:
    dimension: float
    used: int
    """Points whose μ entered the estimate."""
    dropped_duplicates: int
    """Points dropped because another point coincides with them (r₁ = 0)."""


def nearest_neighbour_ratios(points: torch.Tensor) -> tuple:
    """(μ for points with r₁ > 0, number of points with r₁ = 0). points: (N, D), N ≥ 3."""
    if points.dim() != 2 or points.shape[0] < 3:
        raise ValueError(f"TwoNN needs an (N, D) tensor with N >= 3 points, got shape {tuple(points.shape)}")
    data = points.detach().to(torch.float64)
    if not torch.isfinite(data).all():
        raise ValueError("TwoNN: the points contain NaN or Inf")
    distances = torch.cdist(data, data, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros for duplicates
    distances.fill_diagonal_(math.inf)
    nearest, _ = distances.topk(2, dim=1, largest=False)
    first, second = nearest[:, 0], nearest[:, 1]
    keep = first > 0
    return second[keep] / first[keep], int((~keep).sum())


def twonn(points: torch.Tensor, method: str = "mle", discard_fraction: float = 0.1) -> TwoNNResult:
    """The intrinsic dimension of ``points`` (N, D) with the counts behind it."""
    if method not in ("mle", "fit"):
        raise ValueError(f"method={method!r} is not one of ['mle', 'fit']")
    ratios, duplicates = nearest_neighbour_ratios(points)
    if ratios.numel() < 3:
        raise ValueError(f"TwoNN: only {ratios.numel()} distinct points left after dropping {duplicates} duplicates")
    logs = torch.log(ratios)
    if method == "mle":
        total = float(logs.sum())
        dimension = ratios.numel() / total if total > 0 else math.inf
        if not math.isfinite(dimension):
            raise ValueError("TwoNN: every point has equidistant first and second neighbours; no dimension")
        return TwoNNResult(dimension, ratios.numel(), duplicates)
    logs, _ = torch.sort(logs)
    count = logs.numel()
    cdf = torch.arange(1, count + 1, dtype=torch.float64) / count
    kept = max(2, int(math.floor(count * (1 - discard_fraction))))
    x, y = logs[:kept], -torch.log1p(-cdf[:kept])
    denominator = float((x * x).sum())
    if denominator == 0:
        raise ValueError("TwoNN: every point has equidistant first and second neighbours; no dimension")
    return TwoNNResult(float((x * y).sum()) / denominator, kept, duplicates)


def twonn_dimension(points: torch.Tensor, method: str = "mle") -> float:
    """The TwoNN intrinsic dimension of points (N, D); ``method`` is ``mle`` or ``fit``."""
    return twonn(points, method).dimension
