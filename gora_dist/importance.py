"""Layer importance from a weight and its averaged gradient (pure functions, no collectives).

Paper, Eq. 4: I(W) = avg(|W ⊙ Ḡ|). The ablation (Table 6) also scores layers by the nuclear
norm of Ḡ or of W ⊙ Ḡ. ``mean_abs_wg`` is split into a (sum, count) pair so that shards of one
weight can be scored separately and summed later (the distributed path relies on that).
"""

from __future__ import annotations

from typing import Mapping, Tuple

import torch


def abs_wg_partial_sum(weight: torch.Tensor, grad: torch.Tensor) -> Tuple[float, int]:
    """Σ|W⊙Ḡ| and the element count over whatever part of the weight is given (whole or shard)."""
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and gradient {tuple(grad.shape)} differ in shape")
    product = weight.detach().to(torch.float32) * grad.to(torch.float32)
    return float(product.abs().sum(dtype=torch.float64)), product.numel()


def nuclear_norm(matrix: torch.Tensor) -> float:
    """‖M‖_*: sum of singular values, computed in float64 (for the ablation metrics)."""
    return float(torch.linalg.svdvals(matrix.to(torch.float64)).sum())


def layer_importance(metric: str, weight: torch.Tensor, grad: torch.Tensor) -> float:
    """Importance of one layer. weight, grad: (out, in), the full matrices."""
    if metric == "mean_abs_wg":
        total, count = abs_wg_partial_sum(weight, grad)
        return total / count
    if metric == "grad_nuclear":
        return nuclear_norm(grad)
    if metric == "wg_nuclear":
        return nuclear_norm(weight.detach().to(torch.float32) * grad.to(torch.float32))
    raise ValueError(f"importance={metric!r} is not one of ['mean_abs_wg', 'grad_nuclear', 'wg_nuclear']")


def normalize_importance(importance: Mapping[str, float]) -> dict:
    """Advantage a_i = I_i / Σ_j I_j (paper, Eq. 5). All-zero importance has no allocation."""
    values = list(importance.values())
    for name, value in importance.items():
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"importance of {name} is {value}: it must be finite and >= 0")
    total = sum(values)
    if total <= 0:
        raise ValueError(
            "every target layer has zero importance: the loss does not depend on any of them "
            "(check target_modules and that the batches reach those layers)"
        )
    return {name: value / total for name, value in importance.items()}


def relative_change(previous: Mapping[str, float], current: Mapping[str, float]) -> float:
    """max_i |I_t - I_{t-1}| / (I_{t-1} + 1e-8): the official adaptive-N stopping statistic."""
    return max(abs(current[name] - previous[name]) / (previous[name] + 1e-8) for name in current)
