"""Pure-torch references for the fused kernels: the contract every kernel is tested against."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r).
    The adapter runs in the adapters' dtype (float32 for half-precision bases, as PEFT does) and is
    added in the base output's dtype. Computing x·Aᵀ first keeps the cost at O(r·(in+out)) per token.
    """
    base_out = F.linear(x, weight, bias)
    shrunk = F.linear(x.to(lora_a.dtype), lora_a)
    update = F.linear(shrunk, lora_b)
    return base_out + (scaling * update).to(base_out.dtype)
