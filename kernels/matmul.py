"""One tiled GEMM kernel for every product of the LoRA ops.

    out = α1·(P1·Q1) + α2·(P2·Q2) + bias + C_in        P1: (M, K1), Q1: (K1, N), P2: (M, K2), Q2: (K2, N)

with the second product, the bias and C_in optional, every operand addressed through its strides (a
transpose is a view, never a copy), one float32 accumulator per output tile and a single cast on store.
The LoRA ops are all instances of it:

    forward   y  = x·W0ᵀ + (s·S)·Bᵀ + b      (base tile and rank-r update in one accumulator)
    shrink    S  = x·Aᵀ
    backward  dS = s·dY·B,   dB = s·dYᵀ·S,   dA = dSᵀ·x,   dX = dY·W0 + dS·A   (one accumulator)

Precision contract (the launcher chooses, the kernel obeys):
- product 1 runs in its operands' dtype (bf16/fp16 tensor cores with float32 accumulation) when both
  have the same dtype; mixed dtypes (dY in bf16 against B in fp32) are upcast to float32;
- product 2 (the rank-r term) always runs with float32 operands;
- float32 × float32 products use ``precision``: "ieee" (exact float32) or "tf32" (tensor cores, 10-bit
  mantissa; the LoRA ops pick it only for 16-bit layers, whose outputs round to 7-10 bits anyway);
- under the interpreter every operand is upcast to float32 (its bf16 arithmetic is wrong otherwise).
Ranks and other small dimensions are padded to a power of two ≥ 16 by masked loads (``tl.dot`` needs
≥ 16, ``tl.arange`` powers of two); padded rows and columns load as zeros and are never stored.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, on_device_of


AUTOTUNE_ENV = "GORA_KERNEL_AUTOTUNE"


def autotuning() -> bool:
    """True when ``GORA_KERNEL_AUTOTUNE=1``: benchmark every fitting tile once per key. Off by default:
    a heterogeneous-rank model meets dozens of keys, and on an H200 tuning them all held the first
    training steps of a 1B model for over a minute (benchmarks/results/gpu_nvidia_h200.md)."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() not in ("", "0", "false")


def _configs():
    if interpreting():  # the interpreter cannot autotune over several configs; big tiles run fastest there
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # Triton's matmul tutorial tiles for Hopper/Ampere, plus narrow tiles for rank-sized outputs. In
    # this order: without autotuning the first that fits the output is taken.
    shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
              (128, 256, 64, 8, 3), (128, 32, 64, 4, 4), (64, 32, 128, 4, 4), (32, 32, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def size_bucket(size: int) -> int:
    """The autotuning key of a dimension: its power of two, at least 32 (every rank up to 32 shares one)."""
    return max(32, triton.next_power_of_2(max(size, 1)))


def fitting_configs(configs, m: int, n: int):
    """The tiles not far wider than the (m, n) output (a rank-sized N or M), at least one; without
    autotuning only the first of them, so a key costs one compile and no benchmark."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= size_bucket(m) and c.kwargs["BLOCK_N"] <= size_bucket(n)]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept if autotuning() else kept[:1]


def _prune(configs, named_args, **_):
    return fitting_configs(configs, named_args["M"], named_args["N"])


@triton.autotune(
    configs=_configs(),
    # buckets, not sizes: the rank (N of the shrink, M of dA, K2 everywhere) would otherwise make a key
    # per distinct rank; BLOCK_K2 is a constexpr, so ranks past 16 and 32 still compile their own variant
    key=["M_BUCKET", "N_BUCKET", "K1_BUCKET", "HAS_P2", "HAS_C_IN", "UPCAST1"],  # tensor dtypes are added by triton
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["c_in_ptr"],  # C_in may be the output itself (in-place accumulation): restore between trials
)
@triton.jit
def _two_product_kernel(
    out_ptr, p1_ptr, q1_ptr, p2_ptr, q2_ptr, bias_ptr, c_in_ptr,
    M, N, K1, K2, M_BUCKET, N_BUCKET, K1_BUCKET,
    stride_om, stride_on,
    stride_p1m, stride_p1k, stride_q1k, stride_q1n,
    stride_p2m, stride_p2k, stride_q2k, stride_q2n,
    stride_cm, stride_cn,
    alpha1, alpha2,
    HAS_P2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C_IN: tl.constexpr,
    UPCAST1: tl.constexpr, PRECISION1: tl.constexpr, PRECISION2: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order (Triton's matmul tutorial): GROUP_M row-tiles share the Q tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * tiles_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_offsets = tl.arange(0, BLOCK_K)
    for k_start in range(0, K1, BLOCK_K):
        # int64 like rows and cols: dA and dB reduce over tokens, and token × stride passes 2^31 at ~150k
        # tokens of a 14336-wide layer (an int32 offset would wrap and read elsewhere)
        ks = (k_start + k_offsets).to(tl.int64)
        k_ok = ks < K1
        p = tl.load(p1_ptr + rows[:, None] * stride_p1m + ks[None, :] * stride_p1k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q1_ptr + ks[:, None] * stride_q1k + cols[None, :] * stride_q1n,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST1:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION1)
    acc = acc * alpha1

    if HAS_P2:  # the rank-sized product, into the same accumulator
        k2_offsets = tl.arange(0, BLOCK_K2)
        for k_start in range(0, K2, BLOCK_K2):
            ks = (k_start + k2_offsets).to(tl.int64)
            k_ok = ks < K2
            p = tl.load(p2_ptr + rows[:, None] * stride_p2m + ks[None, :] * stride_p2k,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            q = tl.load(q2_ptr + ks[:, None] * stride_q2k + cols[None, :] * stride_q2n,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(p * alpha2, q, acc, input_precision=PRECISION2)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_C_IN:
        acc += tl.load(c_in_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                       mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _rank_block(size: int) -> int:
    """Reduction tile for the rank-sized product: a power of two in [16, 64]."""
    return min(64, max(16, triton.next_power_of_2(max(size, 1))))


def two_product_matmul(
    out: torch.Tensor,
    p1: torch.Tensor,
    q1: torch.Tensor,
    *,
    alpha1: float = 1.0,
    p2: torch.Tensor | None = None,
    q2: torch.Tensor | None = None,
    alpha2: float = 1.0,
    bias: torch.Tensor | None = None,
    c_in: torch.Tensor | None = None,
    precise: bool = True,
) -> torch.Tensor:
    """out (M, N) ← α1·p1·q1 + α2·p2·q2 + bias + c_in, written in out's dtype; returns out.

    p1: (M, K1), q1: (K1, N), p2: (M, K2), q2: (K2, N), bias: (N,), c_in: (M, N), any strides (views
    welcome; c_in may be out itself). precise=False lets float32 × float32 products use TF32.
    Shapes are the caller's contract (the LoRA ops check user inputs before they get here).
    """
    M, K1 = p1.shape
    N = q1.shape[1]
    has_p2 = p2 is not None
    K2 = p2.shape[1] if has_p2 else 0
    assert q1.shape[0] == K1 and tuple(out.shape) == (M, N), (p1.shape, q1.shape, out.shape)
    assert not has_p2 or (p2.shape[0] == M and tuple(q2.shape) == (K2, N)), (p2.shape, q2.shape)
    if M == 0 or N == 0:
        return out
    fp32_precision = "ieee" if precise or interpreting() else "tf32"
    upcast1 = interpreting() or p1.dtype != q1.dtype
    both_fp32 = upcast1 or p1.dtype == torch.float32
    p2_, q2_ = (p2, q2) if has_p2 else (out, out)  # unused pointers still need a tensor
    c_in_ = c_in if c_in is not None else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with on_device_of(out):  # Triton launches on the current CUDA device
        _two_product_kernel[grid](
            out, p1, q1, p2_, q2_, bias if bias is not None else out, c_in_,
            M, N, K1, K2, size_bucket(M), size_bucket(N), size_bucket(K1),
            out.stride(0), out.stride(1),
            p1.stride(0), p1.stride(1), q1.stride(0), q1.stride(1),
            p2_.stride(0), p2_.stride(1), q2_.stride(0), q2_.stride(1),
            c_in_.stride(0), c_in_.stride(1),
            float(alpha1), float(alpha2),
            HAS_P2=has_p2, HAS_BIAS=bias is not None, HAS_C_IN=c_in is not None,
            UPCAST1=upcast1, PRECISION1=fp32_precision if both_fp32 else "ieee", PRECISION2=fp32_precision,
            BLOCK_K2=_rank_block(K2),
        )
    return out
