"""LoRA-GA, LoRA-One and PiSSA initial adapters from singular triplets (pure functions, no
collectives), beside GoRA's pseudo-inverse solve (``initialization.py``).

Each takes the leading singular triplets (U (out × k), S (k,), Vh (k × in), from
``sharded_svd.sharded_svd`` or a dense SVD) of the matrix its method decomposes, and returns
(A0 (r × in), B0 (out × r)) in float32, torch's layout (W (out × in), effective weight W + s·B·A,
s = α/√r with rsLoRA, α/r without). Where the reference code and the paper differ, the reference
code is followed; the choices are written where they are made. Singular vectors are defined up to a
sign per triplet, so two correct implementations agree on A0, B0 up to those signs (and on the
products where a sign cancels).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

Factors = Tuple[torch.Tensor, torch.Tensor]

LORA_GA_STABLE_GAMMA = 16.0
"""PEFT's ``LoraGAConfig.stable_gamma`` default."""

LORA_ONE_GAMMA = 128.0
"""LoRA-One's ``stable_gamma`` default (YuanheZ/LoRA-One, conf/init/gradient.yaml)."""


def _check(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, needed: int, method: str) -> None:
    if s.numel() < needed:
        raise ValueError(f"{method}: needs {needed} singular triplets, got {s.numel()}")


def lora_ga_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, *,
                    stable_gamma: float = LORA_GA_STABLE_GAMMA) -> Factors:
    """LoRA-GA (arXiv 2407.05000) from the SVD of the averaged gradient Ḡ (no sign flip), as PEFT
    0.21 implements it (``lora_ga_init``, direction ``ArB2r``, scale ``stable``):

        A0 = Vhᵀ[:, :r]ᵀ (unit rows),   B0 = U[:, r:2r]·diag(S[r:2r])·out^{1/4}/√γ,   γ = 16.

    (The authors' repository puts no singular values in B0 and scales both factors by out^{1/4}/√γ;
    PEFT's version is the one users compare against.) The base is offset by −s·B0·A0
    (:func:`base_offset`), so the model's output at step 0 is unchanged."""
    _check(u, s, vh, 2 * rank, "lora_ga")
    out_features = u.shape[0]
    lora_a = vh[:rank]
    lora_b = u[:, rank:2 * rank] * s[rank:2 * rank] * (out_features ** 0.25 / math.sqrt(stable_gamma))
    return lora_a.float().contiguous(), lora_b.float().contiguous()


def pissa_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float) -> Factors:
    """PiSSA (arXiv 2404.02948) from the SVD of the base weight W, as PEFT's ``pissa_init``:

        A0 = diag(√(S_r/s))·Vh_r,   B0 = U_r·diag(√(S_r/s)),   so that s·B0·A0 = U_r·diag(S_r)·Vh_r,

    the principal part of W; the base becomes the residual W − s·B0·A0 (:func:`base_offset`)."""
    _check(u, s, vh, rank, "pissa")
    root = torch.sqrt(s[:rank] / scaling)
    return (root[:, None] * vh[:rank]).float().contiguous(), (u[:, :rank] * root).float().contiguous()


def lora_one_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, *,
                     gamma: float = LORA_ONE_GAMMA) -> Factors:
    """LoRA-One (arXiv 2502.01235) from the SVD of −Ḡ (pass the triplets of −Ḡ), as its official code
    (``reinit_lora_modules``, direction ``LoRA-One``, scale ``stable``):

        B0 = U_r·diag(√S_r)/√(σ₁γ),   A0 = diag(√S_r)·Vh_r/√(σ₁γ),   γ = 128,

    the top r triplets in both factors. The base is not offset: at step 0 the effective weight is
    W − (s/(γσ₁))·[Ḡ]_r, one descent step along Ḡ's best rank-r approximation. (The README's formula
    has S for √S and no σ₁; the code is followed.)"""
    _check(u, s, vh, rank, "lora_one")
    if float(s[0]) == 0.0:
        zeros_a = torch.zeros(rank, vh.shape[1], dtype=torch.float32, device=vh.device)
        return zeros_a, torch.zeros(u.shape[0], rank, dtype=torch.float32, device=u.device)
    root = torch.sqrt(s[:rank]) / math.sqrt(float(s[0]) * gamma)
    return (root[:, None] * vh[:rank]).float().contiguous(), (u[:, :rank] * root).float().contiguous()


def base_offset(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, rows: slice = slice(None)) -> torch.Tensor:
    """−s·B0·A0 for the given rows of W (float32): what LoRA-GA and PiSSA add to the base so that
    W' + s·B0·A0 = W. A rank that holds rows [a, b) of W computes only those."""
    return -scaling * (lora_b[rows].float() @ lora_a.float())


def shard_base_offset(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, shard) -> torch.Tensor:
    """The elements of −s·B0·A0 that a :class:`~gora_dist.method.shards.FlatShard` of W owns
    (flat, float32): the rows it touches are formed, nothing more (a ZeRO-3 partition may start and
    end inside a row)."""
    if shard.numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=lora_a.device)
    first_row, last_row = shard.start // shard.cols, -(-shard.stop // shard.cols)
    block = base_offset(lora_a, lora_b, scaling, slice(first_row, last_row)).reshape(-1)
    start = shard.start - first_row * shard.cols
    return block[start:start + shard.numel]
