"""Rank allocation from normalised importances (pure functions, no collectives).

Paper, Eq. 6-7: budget b = Σ_i f(m_i, n_i)·r_ref and r_i = clip(round(b·a_i / f(m_i, n_i)), r_min, r_max)
with f = √(m+n). The official scripts use f = m+n, which makes b LoRA's parameter count at r_ref.
A rank is also capped at min(in, out) so that A0·A0ᵀ stays invertible.
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
) -> dict:
    """Per-layer ranks. advantage: a_i summing to 1; shapes: (out, in) per layer; same keys, same order."""
    if set(advantage) != set(shapes):
        missing = sorted(set(advantage) ^ set(shapes))
        raise ValueError(f"advantage and shapes name different layers: {missing}")
    budget = rank_budget(shapes, rank_ref, features)
    ranks = {}
    for name, shape in shapes.items():
        ideal = budget * advantage[name] / rank_feature(shape, features)
        rank = min(max(round_rank(ideal, rounding), rank_min), rank_max)
        ranks[name] = min(rank, min(shape))
    return ranks


def lora_param_count(shapes: Mapping[str, Shape], ranks: Mapping[str, int]) -> int:
    """Trainable parameters of adapters with these ranks: Σ_i (m_i + n_i)·r_i."""
    return sum((shape[0] + shape[1]) * ranks[name] for name, shape in shapes.items())


def lora_reference_count(shapes: Mapping[str, Shape], rank_ref: int) -> int:
    """Trainable parameters of plain LoRA at ``rank_ref`` on the same layers (the budget to compare to)."""
    return sum((shape[0] + shape[1]) * min(rank_ref, min(shape)) for shape in shapes.values())
