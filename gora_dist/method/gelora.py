"""GeLoRA ranks (arXiv 2412.09250): from the intrinsic dimension (ID) of each block's hidden states.

Points: one per sequence, the mean of a level's hidden states over the tokens its attention mask
keeps (all tokens without a mask). Level 0 is the input embeddings, level i the output of block i.
They are collected by forward hooks during GoRA's own gradient-estimation forwards (no extra
passes), so the sample is every sequence of the N estimation batches: N × global batch points of
(blocks + 1) × hidden floats, e.g. 64 × 31 × 576 float32 = 4.6 MB for SmolLM2-135M at the launcher's
defaults. Every rank gets all points (an all-reduce of a zero-padded buffer), computes the same IDs,
and GeLoRA's bound gives block i the rank max(⌈d_i − d_{i−1}⌉, 0) for all of its adapted matrices.
TwoNN needs hundreds of points to be steady: raise ``grad_steps`` (or the batch) for a better ID.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from gora_dist.method.allocation import Shape, clip_ranks, fit_to_budget, lora_param_count, lora_reference_count
from gora_dist.method.intrinsic_dimension import twonn


def level_dimensions(points: torch.Tensor, method: str = "mle") -> List[float]:
    """TwoNN ID of every level. points: (levels, N, hidden)."""
    return [twonn(level, method).dimension for level in points]


def block_ranks(dimensions: Sequence[float], offset: int = 0) -> List[int]:
    """GeLoRA's lower bound per block: max(⌈d_i − d_{i−1}⌉, 0) + offset, for i = 1..L."""
    return [max(math.ceil(dimensions[i] - dimensions[i - 1]), 0) + offset for i in range(1, len(dimensions))]


def gelora_rank_map(
    ranks_per_block: Sequence[int],
    block_names: Sequence[str],
    shapes: Mapping[str, Shape],
    *,
    rank_ref: int,
    rank_min: int,
    rank_max: int,
    scale_to_budget: bool = False,
) -> Tuple[Dict[str, int], List[str]]:
    """(rank per target layer, notes). A layer takes its block's rank; layers in no block take rank_ref.
    With ``scale_to_budget`` all raw ranks are multiplied so Σ(in+out)·r matches LoRA at rank_ref."""
    raw, notes = {}, []
    for name in shapes:
        owner = next((i for i, block in enumerate(block_names) if name.startswith(block + ".")), None)
        if owner is None:
            notes.append(f"{name}: in no transformer block, given rank_ref={rank_ref}")
        raw[name] = float(rank_ref if owner is None else ranks_per_block[owner])
    if scale_to_budget:
        if any(value > 0 for value in raw.values()):
            target = lora_reference_count(shapes, rank_ref)
            ranks = fit_to_budget(raw, shapes, target, rank_min=rank_min, rank_max=rank_max)
            notes.append(f"GeLoRA ranks scaled to LoRA's budget at rank_ref={rank_ref}: "
                         f"{lora_param_count(shapes, ranks):,} of {target:,} parameters after clipping")
            return ranks, notes
        notes.append("every GeLoRA rank is 0: nothing to scale, ranks are clipped as they are")
    ranks = clip_ranks(raw, shapes, rank_min=rank_min, rank_max=rank_max)
    return ranks, notes
