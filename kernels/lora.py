"""Fused LoRA layer y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ with W0 (and b) frozen, for any rank ≥ 1.

Forward, two launches: S = x·Aᵀ (M, r) in float32 (read x once for the shrink), then one GEMM whose
accumulator takes the base tile x·W0ᵀ, then the rank-r product (s·S)·Bᵀ, then b, cast once on store.
Backward, four launches: dS = s·dY·B, dB = s·dYᵀ·S, dX = dY·W0 + dS·A (one accumulator), dA = dSᵀ·x.

Dtype contract (checked against ``reference.lora_linear_reference``):
- x, W0 and b share a dtype (fp32, fp16 or bf16); y and dX come out in it;
- A and B share a float dtype (float32 in GoRALinear); S and dS are float32; dA, dB come out in it;
- the base product runs in x's dtype with float32 accumulation; the rank-r products run with float32
  operands (TF32 on GPU for 16-bit layers, exact float32 for float32 layers and under the interpreter);
- y is rounded once, from the float32 sum. The reference rounds twice (base output, then the sum), so
  the two differ by about one unit in the last place of y's dtype.

ZeRO-3: W0 must be available in forward (the caller's hooks gather it). In backward a W0 that DeepSpeed
has re-partitioned in between is gathered and re-partitioned, as DeepSpeed's ``LinearFunctionForZeroStage3``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .dispatch import KERNEL_DTYPES
from .matmul import two_product_matmul

HALF_FLOATS = KERNEL_DTYPES


def check_lora_args(x, weight, bias, lora_a, lora_b, name: str = "lora_linear") -> None:
    """ValueError naming the tensor when shapes, dtypes or devices do not fit y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    if weight.dim() != 2:
        hint = " (a partitioned ZeRO-3 parameter: call this where it is gathered)" if hasattr(weight, "ds_id") else ""
        raise ValueError(f"{name}: weight must be (out, in), got shape {tuple(weight.shape)}{hint}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{name}: x {tuple(x.shape)} must end in in_features={in_features} (weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} must be ({out_features},) for weight {tuple(weight.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features or lora_a.shape[0] < 1:
        raise ValueError(f"{name}: lora_a {tuple(lora_a.shape)} must be (rank >= 1, {in_features})")
    if tuple(lora_b.shape) != (out_features, lora_a.shape[0]):
        raise ValueError(f"{name}: lora_b {tuple(lora_b.shape)} must be ({out_features}, {lora_a.shape[0]}) "
                         f"for weight {tuple(weight.shape)} and lora_a {tuple(lora_a.shape)}")
    if x.dtype not in HALF_FLOATS or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"{name}: x ({x.dtype}), weight ({weight.dtype}) and bias "
                         f"({None if bias is None else bias.dtype}) must share one of {HALF_FLOATS}")
    if lora_a.dtype not in HALF_FLOATS or lora_b.dtype != lora_a.dtype:
        raise ValueError(f"{name}: lora_a ({lora_a.dtype}) and lora_b ({lora_b.dtype}) must share one of {HALF_FLOATS}")
    devices = {t.device for t in (x, weight, bias, lora_a, lora_b) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name}: x, weight, bias, lora_a and lora_b must be on one device, got {sorted(map(str, devices))}")


@contextmanager
def gathered_if_partitioned(weight: torch.Tensor):
    """Yield with a ZeRO-3 parameter gathered if DeepSpeed has partitioned it (ds_status NOT_AVAILABLE),
    re-partitioning it afterwards even on error; plain tensors pass through. Needs no deepspeed import."""
    partitioned = hasattr(weight, "ds_id") and getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"
    if partitioned:
        weight.all_gather()
    try:
        yield weight
    finally:
        if partitioned:
            weight.partition()


# --- launchers (plain functions on 2-D tensors) ---------------------------------------------------------

def shrink(x2: torch.Tensor, lora_a: torch.Tensor, *, precise: bool) -> torch.Tensor:
    """S = x·Aᵀ: x2 (M, in), lora_a (r, in) -> (M, r) float32."""
    shrunk = torch.empty(x2.shape[0], lora_a.shape[0], dtype=torch.float32, device=x2.device)
    return two_product_matmul(shrunk, x2, lora_a.t(), precise=precise)


def base_plus_update(x2, weight, bias, shrunk, lora_b, scaling: float, *, precise: bool) -> torch.Tensor:
    """y = x·W0ᵀ + (s·S)·Bᵀ + b in x's dtype: x2 (M, in), weight (out, in), shrunk (M, r), lora_b (out, r)."""
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x2.dtype, device=x2.device)
    return two_product_matmul(out, x2, weight.t(), p2=shrunk, q2=lora_b.t(), alpha2=scaling, bias=bias, precise=precise)


def grad_shrunk(dy2, lora_b, scaling: float, *, out: torch.Tensor | None = None, precise: bool) -> torch.Tensor:
    """dS = s·dY·B: dy2 (M, out), lora_b (out, r) -> (M, r) float32 (into ``out`` when given, a view is fine)."""
    if out is None:
        out = torch.empty(dy2.shape[0], lora_b.shape[1], dtype=torch.float32, device=dy2.device)
    return two_product_matmul(out, dy2, lora_b, alpha1=scaling, precise=precise)


def grad_lora_b(dy2, shrunk, scaling: float, dtype: torch.dtype, *, precise: bool) -> torch.Tensor:
    """dB = s·dYᵀ·S: dy2 (M, out), shrunk (M, r) -> (out, r) in ``dtype``."""
    out = torch.empty(dy2.shape[1], shrunk.shape[1], dtype=dtype, device=dy2.device)
    return two_product_matmul(out, dy2.t(), shrunk, alpha1=scaling, precise=precise)


def grad_lora_a(d_shrunk, x2, dtype: torch.dtype, *, precise: bool) -> torch.Tensor:
    """dA = dSᵀ·x: d_shrunk (M, r), x2 (M, in) -> (r, in) in ``dtype``."""
    out = torch.empty(d_shrunk.shape[1], x2.shape[1], dtype=dtype, device=x2.device)
    return two_product_matmul(out, d_shrunk.t(), x2, precise=precise)


def grad_input(dy2, weight, d_shrunk, lora_a, *, out: torch.Tensor, c_in=None, precise: bool) -> torch.Tensor:
    """dX = dY·W0 + dS·A (+ c_in) into ``out`` (M, in); d_shrunk/lora_a may be None (base term only)."""
    return two_product_matmul(out, dy2, weight, p2=d_shrunk, q2=lora_a, c_in=c_in, precise=precise)


# --- autograd ---------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    """Differentiable in x, lora_a and lora_b; weight and bias are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        precise = x.dtype == torch.float32
        shrunk = shrink(x2, lora_a, precise=precise)
        out = base_plus_update(x2, weight, bias, shrunk, lora_b, scaling, precise=precise)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, shrunk)
        ctx.scaling, ctx.precise, ctx.x_shape = scaling, precise, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # not differentiable itself: double backward raises
    def backward(ctx, grad_out):
        x2, weight, lora_a, lora_b, shrunk = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        s, precise = ctx.scaling, ctx.precise
        dy2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_a = grad_b = None
        d_shrunk = grad_shrunk(dy2, lora_b, s, precise=precise) if (need_x or need_a) else None
        if need_b:
            grad_b = grad_lora_b(dy2, shrunk, s, lora_b.dtype, precise=precise)
        if need_x:
            with gathered_if_partitioned(weight):
                grad_x = grad_input(dy2, weight, d_shrunk, lora_a, out=torch.empty(x2.shape, dtype=x2.dtype, device=x2.device),
                                    precise=precise)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = grad_lora_a(d_shrunk, x2, lora_a.dtype, precise=precise)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r); any r ≥ 1.
    Raises ValueError on shapes, dtypes or devices that do not fit, and when weight or bias requires grad.
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear_triton: weight and bias must be frozen (requires_grad=False); "
                         "use lora_linear, which falls back to the torch reference for trainable bases")
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling))
