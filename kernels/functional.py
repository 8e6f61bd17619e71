"""The functional entries of ``gora_dist.kernels``: each runs its Triton kernel where it can run and fits
the call, else its pure-torch reference (``reference.py``). Re-exported by the package's ``__init__``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import kernel_dtypes, triton_can_run
from .reference import grouped_lora_linear_reference, lora_linear_reference, projected_gradient_reference


def _frozen(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or not t.requires_grad for t in tensors)


def _lora_kernel_fits(x, weights, biases, lora_as, lora_bs) -> bool:
    """The kernels take the call: they can run on these tensors, the bases are frozen, the dtypes fit
    (float64 and mixed dtypes take the reference), and no autocast is active on x's device (the
    reference casts as autocast says, the kernels do not)."""
    return (triton_can_run(x, *weights, *biases, *lora_as, *lora_bs) and _frozen(*weights, *biases)
            and kernel_dtypes(x, weights, biases, lora_as, lora_bs) and not torch.is_autocast_enabled(x.device.type))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Functional LoRA layer y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ; differentiable in x, lora_a and lora_b.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r).
    Triton where it can run, the base (weight, bias) is frozen, x/weight/bias share a float32, float16
    or bfloat16 dtype and lora_a/lora_b another (or the same), and autocast is off; else
    ``lora_linear_reference``.
    """
    if _lora_kernel_fits(x, [weight], [bias], [lora_a], [lora_b]):
        from .lora import lora_linear_triton

        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)


def grouped_lora_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                        lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor],
                        scalings: Sequence[float]) -> list[torch.Tensor]:
    """[x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ] for projections sharing x, with one shrink GEMM for all A_i.

    Differentiable in x and every A_i, B_i. Triton where it can run, all bases are frozen and the dtypes
    fit as in ``lora_linear`` (one adapter dtype for all), else the per-projection reference.
    """
    if _lora_kernel_fits(x, weights, biases, lora_as, lora_bs):
        from .grouped_lora import grouped_lora_linear_triton

        return grouped_lora_linear_triton(x, weights, biases, lora_as, lora_bs, scalings)
    return grouped_lora_linear_reference(x, weights, biases, lora_as, lora_bs, scalings)


def projected_gradient(grad_rows: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """C = Ḡ·A0ᵀ (rows, r) float32; Triton where it can run, else the torch reference."""
    if triton_can_run(grad_rows) and 1 <= lora_a.shape[0]:
        from .pinv_solve import MAX_RANK, projected_gradient_triton

        if lora_a.shape[0] <= MAX_RANK:
            return projected_gradient_triton(grad_rows, lora_a)
    return projected_gradient_reference(grad_rows, lora_a)
