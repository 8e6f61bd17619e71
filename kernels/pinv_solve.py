"""GoRA's initial B0 = -ξ·Ḡ·A0ᵀ·(A0A0ᵀ)⁻¹ (paper Eq. 8-9; ``gora_dist.method.initialization``), fused.

One kernel reads a block of Ḡ's rows once, multiplies by A0ᵀ into a float32 (rows, r) accumulator and,
when given K⁻¹ = (A0A0ᵀ)⁻¹ (r × r, from the float64 Cholesky factor, passed as float32), applies
-ξ·K⁻¹ in the epilogue and writes B0 in the requested dtype. Without K⁻¹ it writes C = Ḡ·A0ᵀ, which is
what a sharded plan needs (C must be summed over ranks before the solve, since ZeRO-3 partitions cut
rows). Rows are independent, so a row shard of Ḡ gives the same rows of C and B0.

Precision: all products use exact float32 ("ieee"): the init feeds training directly, and this kernel
is memory-bound (it reads Ḡ, 4 bytes per element, for 2r flops per element). K⁻¹ in float32 is fine for
GoRA's A0: Kaiming-uniform with r ≪ in makes A0A0ᵀ ≈ (in/3)·bound²·I, condition number near 1.

Many layers: one launch per layer (``pinv_init_b_layers``). For an 8B model that is 224 launches
(~2-3 ms of launch overhead), against ~28 GB of Ḡ to read (~10 ms at H100 bandwidth); a single grouped
launch over pointer tables would save the launches only, and is left as an unmeasured idea.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, on_device_of

# The whole rank sits in one tile (K⁻¹ mixes all columns). Shared memory per block on sm_90 (H100 limit
# 232,448 B), BLOCK_M = BLOCK_K = 64, 3 stages: C alone 163,840 B at rank 256; with the K⁻¹ epilogue
# 131,072 B at rank 128 but 327,680 B at 256. So the kernel applies K⁻¹ up to MAX_SOLVE_RANK; above it
# the kernel writes C and the solve runs in torch (float64), as test_kernels_compile_for_sm90 checks.
MAX_RANK = 256
MAX_SOLVE_RANK = 128


def _block_sizes() -> dict:
    """One fixed config, no autotuning: the kernel is bound by reading Ḡ, and autotuning the ~10
    (rows, in, rank) shapes of a model would cost more at init than it could save (untuned on GPU)."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


@triton.jit
def _project_solve_kernel(
    out_ptr, grad_ptr, a_ptr, kinv_ptr,
    rows, cols, rank,
    stride_om, stride_or, stride_gm, stride_gk, stride_ar, stride_ak,
    neg_xi,
    HAS_SOLVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rm < rows
    rank_ok = rr < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_offsets = tl.arange(0, BLOCK_K)
    for k_start in range(0, cols, BLOCK_K):
        ks = (k_start + k_offsets).to(tl.int64)  # int64 like rm: no offset may wrap at 2^31
        k_ok = ks < cols
        grad = tl.load(grad_ptr + rm[:, None] * stride_gm + ks[None, :] * stride_gk,
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=rank_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_R) = A0ᵀ tile
        acc = tl.dot(grad, a_t, acc, input_precision="ieee")
    if HAS_SOLVE:  # B0 = -ξ·C·K⁻¹ (padded rows/columns of K⁻¹ load as zeros)
        kinv = tl.load(kinv_ptr + rr[:, None] * rank + rr[None, :], mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(acc, kinv, input_precision="ieee") * neg_xi
    tl.store(out_ptr + rm[:, None] * stride_om + rr[None, :] * stride_or, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


def _check(grad_rows: torch.Tensor, lora_a: torch.Tensor) -> None:
    if grad_rows.dim() != 2 or lora_a.dim() != 2 or grad_rows.shape[1] != lora_a.shape[1]:
        raise ValueError(f"pinv solve: grad_rows {tuple(grad_rows.shape)} must be (rows, in) and lora_a "
                         f"{tuple(lora_a.shape)} (r, in) with the same in")
    if not 1 <= lora_a.shape[0] <= MAX_RANK:
        raise ValueError(f"pinv solve: rank {lora_a.shape[0]} of lora_a {tuple(lora_a.shape)} must be in [1, {MAX_RANK}]")
    if not (grad_rows.is_floating_point() and lora_a.is_floating_point()):
        raise ValueError(f"pinv solve: grad_rows ({grad_rows.dtype}) and lora_a ({lora_a.dtype}) must be floating point")


def launch_config(rank: int, solve: bool) -> dict:
    """The kernel's constexprs and launch options for this rank: K⁻¹ goes into the kernel only up to
    ``MAX_SOLVE_RANK`` (shared memory, see above); block sizes from ``_block_sizes``."""
    return {"HAS_SOLVE": solve and rank <= MAX_SOLVE_RANK, "BLOCK_R": max(16, triton.next_power_of_2(rank)),
            **_block_sizes()}


def _launch(grad_rows, lora_a, gram_inverse, neg_xi: float, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = grad_rows.shape
    rank = lora_a.shape[0]
    config = launch_config(rank, gram_inverse is not None)
    kernel_dtype = dtype if config["HAS_SOLVE"] or gram_inverse is None else torch.float32
    out = torch.empty(rows, rank, dtype=kernel_dtype, device=grad_rows.device)
    if rows == 0:
        return out.to(dtype)
    lora_a = lora_a.to(grad_rows.device)
    kinv = out
    if gram_inverse is not None:
        kinv = gram_inverse.to(device=grad_rows.device, dtype=torch.float32).contiguous()
    with on_device_of(out):  # Triton launches on the current CUDA device
        _project_solve_kernel[(triton.cdiv(rows, config["BLOCK_M"]),)](
            out, grad_rows, lora_a, kinv, rows, cols, rank,
            out.stride(0), out.stride(1), grad_rows.stride(0), grad_rows.stride(1), lora_a.stride(0), lora_a.stride(1),
            float(neg_xi), **config,
        )
    if gram_inverse is not None and not config["HAS_SOLVE"]:  # rank > MAX_SOLVE_RANK: out is C, solve here
        out = (out.double() @ gram_inverse.to(device=out.device, dtype=torch.float64)).mul_(neg_xi).to(dtype)
    return out


def projected_gradient_triton(grad_rows: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """C = Ḡ·A0ᵀ (rows, r) float32 from grad_rows (rows, in), any subset of Ḡ's rows, and lora_a (r, in)."""
    _check(grad_rows, lora_a)
    return _launch(grad_rows, lora_a, None, 1.0, torch.float32)


def gram_inverse(lora_a: torch.Tensor) -> torch.Tensor:
    """(A0A0ᵀ)⁻¹ (r, r) float32 on lora_a's device, from the float64 Cholesky factor (ValueError if A0 is
    rank deficient)."""
    from gora_dist.method.initialization import gram_cholesky

    return torch.cholesky_inverse(gram_cholesky(lora_a.detach())).to(torch.float32)


def pinv_init_b_triton(grad_rows: torch.Tensor, lora_a: torch.Tensor, xi: float, *,
                       dtype: torch.dtype = torch.float32, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """B0 rows = -ξ·Ḡ·A0ᵀ·(A0A0ᵀ)⁻¹ (rows, r) in ``dtype``; ``inverse`` = gram_inverse(lora_a) if precomputed."""
    _check(grad_rows, lora_a)
    return _launch(grad_rows, lora_a, gram_inverse(lora_a) if inverse is None else inverse, -float(xi), dtype)


def pinv_init_b_layers(grads: dict[str, torch.Tensor], lora_as: dict[str, torch.Tensor], xis: dict[str, float], *,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """B0 for many layers, one launch each: {name: (out, r)} from {name: Ḡ (out, in)}, {name: A0}, {name: ξ}."""
    missing = [name for name in grads if name not in lora_as or name not in xis]
    if missing:
        raise ValueError(f"pinv_init_b_layers: no lora_a or xi for {missing[:3]}")
    return {name: pinv_init_b_triton(grad, lora_as[name], xis[name], dtype=dtype) for name, grad in grads.items()}
