"""GoRA's adapter initialisation (pure functions, no collectives).

A0 is Kaiming-uniform (a=√5, PEFT's default), i.e. U(-1/√in, 1/√in), drawn from a generator seeded by
the run's seed and the module's name: every process of any world size draws the same A0 with no
communication. B0 solves A0-space least squares for the negative averaged gradient (paper, Eq. 8-9):

    B0 = -ξ·Ḡ·A0ᵀ(A0A0ᵀ)⁻¹,   ξ = γ·√(in/r) / s,   s = α/√r (rsLoRA)

so that the initial update is ΔW0 = s·B0·A0 = -γ·√(in/r)·Ḡ·P_A, P_A = A0ᵀ(A0A0ᵀ)⁻¹A0 (torch layout:
lora_A is (r, in), lora_B is (out, r), Ḡ is (out, in)). ΔW0 does not depend on α or on A0's scale.
Everything is row-wise in Ḡ: a row shard of Ḡ gives the same rows of B0.
"""

from __future__ import annotations

import hashlib
import math

import torch


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from the run's seed and a module name (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def kaiming_uniform_a(rank: int, in_features: int, *, seed: int, module_name: str) -> torch.Tensor:
    """A0: (rank, in_features) float32 on the CPU, U(-1/√in, 1/√in) as kaiming_uniform_(a=√5)."""
    generator = torch.Generator(device="cpu").manual_seed(module_seed(seed, module_name))
    bound = 1.0 / math.sqrt(in_features)
    lora_a = torch.empty(rank, in_features, dtype=torch.float32)
    return lora_a.uniform_(-bound, bound, generator=generator)


def rslora_scaling(alpha: float, rank: int, use_rslora: bool = True) -> float:
    """Forward scale s: α/√r (rsLoRA, the paper's runs) or α/r (plain LoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def b0_scale(gamma: float, scaling: float, in_features: int, rank: int) -> float:
    """ξ = γ·√(in/r)/s: with s = α/√r this is the paper's γ·√m/α."""
    return gamma * math.sqrt(in_features / rank) / scaling


def gradient_times_a(grad_rows: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """C = Ḡ·A0ᵀ in float32. grad_rows: (rows, in), any subset of Ḡ's rows; lora_a: (r, in). -> (rows, r)."""
    return grad_rows.to(torch.float32) @ lora_a.to(device=grad_rows.device, dtype=torch.float32).T


def gram_cholesky(lora_a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of A0A0ᵀ (r, r) in float64. Raises ValueError if A0 is rank deficient."""
    a64 = lora_a.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(a64 @ a64.T)
    if int(info) != 0:
        raise ValueError(f"A0·A0ᵀ is not positive definite (rank {lora_a.shape[0]} > in_features {lora_a.shape[1]}?)")
    return factor


def solve_b0(projected: torch.Tensor, gram_factor: torch.Tensor, xi: float) -> torch.Tensor:
    """B0 rows = -ξ·C·(A0A0ᵀ)⁻¹ from C = Ḡ·A0ᵀ (rows, r) and the Gram's Cholesky factor. -> float32."""
    c64 = projected.to(device=gram_factor.device, dtype=torch.float64)
    solved = torch.cholesky_solve(c64.T, gram_factor).T  # K symmetric: (C K⁻¹)ᵀ = K⁻¹ Cᵀ
    return (-xi * solved).to(device=projected.device, dtype=torch.float32)


def projected_energy(projected: torch.Tensor, gram_factor: torch.Tensor) -> float:
    """‖Ḡ·P_A‖²_F = Σ C ⊙ (C·K⁻¹) over the rows given (so row shards can be summed)."""
    c64 = projected.to(device=gram_factor.device, dtype=torch.float64)
    return float((c64 * torch.cholesky_solve(c64.T, gram_factor).T).sum())


def residual_ratio(total_energy: float, kept_energy: float) -> float:
    """‖Ḡ(I - P_A)‖/‖Ḡ‖ from ‖Ḡ‖² and ‖Ḡ·P_A‖² (P_A is an orthogonal projector); 0 for a zero Ḡ."""
    if total_energy == 0.0:
        return 0.0
    return math.sqrt(max(total_energy - kept_energy, 0.0) / total_energy)


def gora_init_b(grad: torch.Tensor, lora_a: torch.Tensor, *, gamma: float, scaling: float):
    """B0 and the projection error of one layer from its full Ḡ (out, in) and A0 (r, in).

    Returns (B0: (out, r) float32, error) with error = ‖ΔW0 + γ√(in/r)Ḡ‖/‖γ√(in/r)Ḡ‖
    = ‖Ḡ(I - P_A)‖/‖Ḡ‖ (independent of γ, reported even for γ = 0).
    """
    rank, in_features = lora_a.shape
    if grad.shape[-1] != in_features:
        raise ValueError(f"gradient has {grad.shape[-1]} columns but A0 has in_features={in_features}")
    projected = gradient_times_a(grad, lora_a)
    factor = gram_cholesky(lora_a)
    error = residual_ratio(float(grad.to(torch.float64).square().sum()), projected_energy(projected, factor))
    if gamma == 0:
        return torch.zeros(grad.shape[0], rank, dtype=torch.float32, device=grad.device), error
    return solve_b0(projected, factor, b0_scale(gamma, scaling, in_features, rank)), error
