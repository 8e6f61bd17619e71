"""Pure-torch references for the fused kernels: the contract every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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


def grouped_lora_linear_reference(x, weights, biases, lora_as, lora_bs, scalings):
    """[lora_linear_reference(x, W_i, b_i, A_i, B_i, s_i) for each i]: projections sharing the input x."""
    return [lora_linear_reference(x, w, b, a, bb, s) for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings)]


def projected_gradient_reference(grad_rows: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """C = Ḡ·A0ᵀ (rows, r) in float32 (``gora_dist.method.initialization.gradient_times_a``)."""
    from gora_dist.method.initialization import gradient_times_a

    return gradient_times_a(grad_rows, lora_a)


def pinv_init_b_reference(grad_rows: torch.Tensor, lora_a: torch.Tensor, xi: float) -> torch.Tensor:
    """B0 rows = -ξ·Ḡ·A0ᵀ·(A0A0ᵀ)⁻¹ (rows, r) float32, solved in float64 as ``build_plan`` does."""
    from gora_dist.method.initialization import gradient_times_a, gram_cholesky, solve_b0

    return solve_b0(gradient_times_a(grad_rows, lora_a), gram_cholesky(lora_a.detach().cpu()), xi)
