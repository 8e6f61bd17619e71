"""Grouped LoRA projections that share one input (q/k/v, gate/up), each with its own rank.

    y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ,   i = 1..n

Forward: one shrink S = x·[A_1; …; A_n]ᵀ (M, Σr_i) reads x once for all adapters; then one fused GEMM
per projection (base tile + s_i·S_i·B_iᵀ in one accumulator, S_i a column slice of S, no copy).
Backward: dS_i = s_i·dY_i·B_i into the column slices of one dS (M, Σr_i); dB_i = s_i·dY_iᵀ·S_i;
dX = Σ dY_i·W_i + dS·[A_1; …; A_n] (the rank term rides with the first projection's base product, the
others add into a float32 buffer, the last launch casts); dA = dSᵀ·x in one launch, split by rows.
Same dtype contract as ``lora.py``; outputs a projection's loss does not use get no backward work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora import (
    base_plus_update,
    check_lora_args,
    gathered_if_partitioned,
    grad_input,
    grad_lora_a,
    grad_lora_b,
    grad_shrunk,
    shrink,
)


class GroupedLoRALinearFunction(torch.autograd.Function):
    """apply(x, scalings, *weights, *biases, *lora_as, *lora_bs) -> tuple of n outputs."""

    @staticmethod
    def forward(ctx, x, scalings, *params):
        count = len(scalings)
        weights, biases = params[:count], params[count:2 * count]
        lora_as, lora_bs = params[2 * count:3 * count], params[3 * count:]
        ctx.set_materialize_grads(False)
        x2 = x.reshape(-1, x.shape[-1])
        precise = x.dtype == torch.float32
        stacked_a = torch.cat(lora_as) if count > 1 else lora_as[0]
        shrunk = shrink(x2, stacked_a, precise=precise)
        offsets = [0]
        for lora_a in lora_as:
            offsets.append(offsets[-1] + lora_a.shape[0])
        outputs = []
        for i in range(count):
            piece = shrunk[:, offsets[i]:offsets[i + 1]]
            y = base_plus_update(x2, weights[i], biases[i], piece, lora_bs[i], scalings[i], precise=precise)
            outputs.append(y.view(*x.shape[:-1], weights[i].shape[0]))
        ctx.save_for_backward(x2, stacked_a, shrunk, *weights, *lora_bs)
        ctx.scalings, ctx.offsets, ctx.precise, ctx.x_shape = tuple(scalings), offsets, precise, x.shape
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable  # not differentiable itself: double backward raises
    def backward(ctx, *grad_outs):
        x2, stacked_a, shrunk, *rest = ctx.saved_tensors
        count = len(ctx.scalings)
        weights, lora_bs = rest[:count], rest[count:]
        offsets, precise = ctx.offsets, ctx.precise
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_a = [needs[2 + 2 * count + i] for i in range(count)]
        need_b = [needs[2 + 3 * count + i] for i in range(count)]
        used = [i for i in range(count) if grad_outs[i] is not None]
        dys = {i: grad_outs[i].reshape(-1, grad_outs[i].shape[-1]) for i in used}

        d_shrunk = None
        if need_x or any(need_a):
            d_shrunk = torch.zeros_like(shrunk)  # unused outputs leave their columns at zero
            for i in used:
                grad_shrunk(dys[i], lora_bs[i], ctx.scalings[i], out=d_shrunk[:, offsets[i]:offsets[i + 1]], precise=precise)
        grad_b: list[torch.Tensor | None] = [None] * count
        for i in used:
            if need_b[i]:
                piece = shrunk[:, offsets[i]:offsets[i + 1]]
                grad_b[i] = grad_lora_b(dys[i], piece, ctx.scalings[i], lora_bs[i].dtype, precise=precise)
        grad_x = None
        if need_x:
            grad_x = _grad_input(x2, weights, dys, d_shrunk, stacked_a, precise).view(ctx.x_shape)
        grad_a: list[torch.Tensor | None] = [None] * count
        if any(need_a):
            stacked_grad = grad_lora_a(d_shrunk, x2, stacked_a.dtype, precise=precise)
            grad_a = [stacked_grad[offsets[i]:offsets[i + 1]] if need_a[i] else None for i in range(count)]
        return (grad_x, None, *([None] * (2 * count)), *grad_a, *grad_b)


def _grad_input(x2, weights, dys, d_shrunk, stacked_a, precise):
    """dX = Σ_i dY_i·W_i + dS·Aᵀ_stacked: one float32 accumulator chained over launches, one final cast."""
    out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    used = list(dys)
    if not used:
        return out.zero_()
    buffer = out if len(used) == 1 else torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
    for position, i in enumerate(used):
        first, last = position == 0, position == len(used) - 1
        target = out if last else buffer
        with gathered_if_partitioned(weights[i]):
            grad_input(dys[i], weights[i], d_shrunk if first else None, stacked_a if first else None,
                       out=target, c_in=None if first else buffer, precise=precise)
    return out


def grouped_lora_linear_triton(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> list[torch.Tensor]:
    """[x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ for each i] through the Triton kernels; x: (..., in),
    weights[i]: (out_i, in), biases[i]: (out_i,) or None, lora_as[i]: (r_i, in), lora_bs[i]: (out_i, r_i).
    Differentiable in x and every A_i, B_i; weights and biases frozen. Raises ValueError on misfits."""
    count = len(weights)
    if count == 0 or not (len(biases) == len(lora_as) == len(lora_bs) == len(scalings) == count):
        raise ValueError(f"grouped_lora_linear: need n >= 1 of each, got {count} weights, {len(biases)} biases, "
                         f"{len(lora_as)} lora_as, {len(lora_bs)} lora_bs, {len(scalings)} scalings")
    for i in range(count):
        check_lora_args(x, weights[i], biases[i], lora_as[i], lora_bs[i], name=f"grouped_lora_linear[{i}]")
        if weights[i].requires_grad or (biases[i] is not None and biases[i].requires_grad):
            raise ValueError(f"grouped_lora_linear[{i}]: weight and bias must be frozen (requires_grad=False)")
    if len({a.dtype for a in lora_as}) != 1:
        raise ValueError(f"grouped_lora_linear: all lora_as must share a dtype, got {[a.dtype for a in lora_as]}")
    params = (*weights, *biases, *lora_as, *lora_bs)
    return list(GroupedLoRALinearFunction.apply(x, tuple(float(s) for s in scalings), *params))
