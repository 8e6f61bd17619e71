"""Layer importance from a weight and its averaged gradient (pure functions, no collectives).

Paper, Eq. 4: I(W) = avg(|W ⊙ Ḡ|). The ablation (Table 6) also scores layers by the nuclear
norm of Ḡ or of W ⊙ Ḡ. ``mean_abs_wg`` is split into a (sum, count) pair so that shards of one
weight can be scored separately and summed later (the distributed path relies on that).
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

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


def nuclear_norm_bytes(metric: str, rows: int, cols: int) -> int:
    """Bytes one rank needs at once to score a (rows, cols) layer by a nuclear norm: the whole
    float32 gradient (and weight, for W⊙Ḡ) gathered, their product, and the SVD's float64 copy and
    workspace (about rows·cols + min(rows, cols)² values)."""
    elements = rows * cols
    gathered = elements * 4 * (1 if metric == "grad_nuclear" else 3)
    return gathered + 8 * (elements + min(rows, cols) ** 2)


def nuclear_norm_refusal(metric: str, shapes: Mapping[str, Tuple[int, int]], available_bytes: int) -> Optional[str]:
    """Why the nuclear-norm ``metric`` cannot run on a rank with ``available_bytes`` free, or None.
    These metrics need a whole layer's matrix in one place by definition; the paper's avg(|W⊙Ḡ|) is
    computed on shards and has no such limit."""
    if metric == "mean_abs_wg" or not shapes:
        return None
    name, (rows, cols) = max(shapes.items(), key=lambda item: item[1][0] * item[1][1])
    need = nuclear_norm_bytes(metric, rows, cols)
    if need <= available_bytes:
        return None
    what = "gradient" if metric == "grad_nuclear" else "gradient and weight"
    return (f"importance={metric}: the nuclear norm needs layer {name}'s whole {rows}x{cols} {what} on one rank, "
            f"about {need / 2**30:.2f} GiB with the SVD, and {available_bytes / 2**30:.2f} GiB is free here; "
            "use importance=mean_abs_wg (the paper's metric, computed on each rank's shard)")


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
