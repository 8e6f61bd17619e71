"""The weight gradient of a linear layer from its input and its output's gradient (a pure function).

For y = x·Wᵀ (+ b) the gradient of the loss with respect to W is Σ over tokens of gᵀ·x, with
g = ∂L/∂y: what autograd computes for a dense weight, and what GoRA computes itself where the weight
cannot have a gradient (a quantised base, ``engines/output_tap``)."""

from __future__ import annotations

import torch


def linear_weight_gradient(grad_output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """∂L/∂W = gᵀ·x summed over every leading dimension: (out, in) float32.

    grad_output: (..., out); inputs: (..., in), the same leading shape. Both are taken to float32
    before the product, so a bfloat16 run's sum is rounded once per step, not once per element."""
    if grad_output.shape[:-1] != inputs.shape[:-1]:
        raise ValueError(f"output gradient {tuple(grad_output.shape)} and input {tuple(inputs.shape)} "
                         "differ in their leading dimensions")
    grads = grad_output.reshape(-1, grad_output.shape[-1]).to(torch.float32)
    rows = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    return grads.T @ rows
