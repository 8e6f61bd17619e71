"""Rank allocation from normalised importances (pure functions, no collectives).

Paper, Eq. 6-7: budget b = Σ_i f(m_i, n_i)·r_ref and r_i = clip(round(b·a_i / f(m_i, n_i)), r_min, r_max)
with f = √(m+n). The official scripts use f = m+n, which makes b LoRA's parameter count at r_ref.
A rank is also capped at min(in, out) so that A0·A0ᵀ stays invertible.

Clipping and rounding move the total away from the budget (a few layers at r_max give up what they
would have taken). ``fit_to_budget`` (an option, not in the paper) rescales the ideal ranks so that
the clipped, rounded total lands as close as it can to LoRA's parameter count at r_ref: for
comparisons at equal trainable budget.
"""

from __future__ import annotations

import math
from typing import Mapping, Tuple

Shape = Tuple[int, int]  # (out_features, in_features), like nn.Linear.weight


def rank_feature(shape: Shape, kind: str) -> float:
    """f(m, n): √(m+n) for ``sqrt`` (paper), m+n for ``identity`` (official scripts)."""
    out_features, in_features = shape
    if kind == "sqrt":
        return math.sqrt(in_features + out_features)
    if kind == "identity":
        return float(in_features + out_features)
    raise ValueError(f"rank_features={kind!r} is not one of ['sqrt', 'identity']")


def round_rank(value: float, rounding: str) -> int:
    """Integer rank from a real one: ``round`` is half up (ties are measure-zero in practice)."""
    if rounding == "round":
        return int(math.floor(value + 0.5))
    if rounding == "floor":
        return int(math.floor(value))
    if rounding == "ceil":
        return int(math.ceil(value))
    raise ValueError(f"rank_rounding={rounding!r} is not one of ['round', 'floor', 'ceil']")


def rank_budget(shapes: Mapping[str, Shape], rank_ref: int, features: str) -> float:
    """b = Σ_i f(m_i, n_i)·r_ref."""
    return sum(rank_feature(shape, features) for shape in shapes.values()) * rank_ref


def allocate_ranks(
    advantage: Mapping[str, float],
    shapes: Mapping[str, Shape],
    *,
    rank_ref: int,
    rank_min: int,
    rank_max: int,
    features: str = "sqrt",
    rounding: str = "round",
    fit_budget: bool = False,
) -> dict:
    """Per-layer ranks. advantage: a_i summing to 1; shapes: (out, in) per layer; same keys, same order.
    With ``fit_budget`` the ideal ranks are rescaled first (see ``fit_to_budget``)."""
    if set(advantage) != set(shapes):
        missing = sorted(set(advantage) ^ set(shapes))
        raise ValueError(f"advantage and shapes name different layers: {missing}")
    budget = rank_budget(shapes, rank_ref, features)
    ideal = {name: budget * advantage[name] / rank_feature(shape, features) for name, shape in shapes.items()}
    if fit_budget:
        return fit_to_budget(ideal, shapes, lora_reference_count(shapes, rank_ref), rank_min=rank_min,
                             rank_max=rank_max, rounding=rounding)
    return clip_ranks(ideal, shapes, rank_min=rank_min, rank_max=rank_max, rounding=rounding)


def uniform_ranks(shapes: Mapping[str, Shape], rank_ref: int) -> dict:
    """Plain LoRA's map (``allocator="uniform"``): every layer at rank_ref, capped at min(out, in)."""
    return {name: min(rank_ref, min(shape)) for name, shape in shapes.items()}


def clip_ranks(ideal: Mapping[str, float], shapes: Mapping[str, Shape], *, rank_min: int, rank_max: int,
               rounding: str = "round") -> dict:
    """Integer ranks: round, clip to [rank_min, rank_max], cap at min(out, in)."""
    return {name: min(max(round_rank(ideal[name], rounding), rank_min), rank_max, min(shape))
            for name, shape in shapes.items()}


def fit_to_budget(ideal: Mapping[str, float], shapes: Mapping[str, Shape], target_params: int, *, rank_min: int,
                  rank_max: int, rounding: str = "round", iterations: int = 60) -> dict:
    """Ranks clip_ranks(λ·ideal) with the λ whose parameter count is nearest ``target_params``.

    The count is a non-decreasing step function of λ, so bisection finds the step that crosses the
    target; the nearer of the two sides wins (ties: the one under budget). Keeps the ideal ranks'
    proportions wherever no clip binds. ideal: real ranks ≥ 0 per layer (not all zero).
    """
    def ranks_at(scale: float) -> dict:
        return clip_ranks({n: scale * v for n, v in ideal.items()}, shapes, rank_min=rank_min, rank_max=rank_max,
                          rounding=rounding)

    positive = [value for value in ideal.values() if value > 0]
    if not positive:
        raise ValueError("fit_to_budget: every ideal rank is 0; nothing to scale")
    low, high = 0.0, (rank_max + 1) / min(positive)  # at `high` every layer with ideal > 0 sits at its cap
    if lora_param_count(shapes, ranks_at(high)) <= target_params:
        return ranks_at(high)
    for _ in range(iterations):
        middle = (low + high) / 2
        if lora_param_count(shapes, ranks_at(middle)) < target_params:
            low = middle
        else:
            high = middle
    under, over = ranks_at(low), ranks_at(high)
    gap_under = target_params - lora_param_count(shapes, under)
    gap_over = lora_param_count(shapes, over) - target_params
    return under if gap_under <= gap_over else over


def lora_param_count(shapes: Mapping[str, Shape], ranks: Mapping[str, int]) -> int:
    """Trainable parameters of adapters with these ranks: Σ_i (m_i + n_i)·r_i."""
    return sum((shape[0] + shape[1]) * ranks[name] for name, shape in shapes.items())


def lora_reference_count(shapes: Mapping[str, Shape], rank_ref: int) -> int:
    """Trainable parameters of plain LoRA at ``rank_ref`` on the same layers (the budget to compare to)."""
    return sum((shape[0] + shape[1]) * min(rank_ref, min(shape)) for shape in shapes.values())
