"""Compute kernels of gora_dist, installed as ``gora_dist.kernels``.

Each op has a pure-torch reference here; fused Triton versions sit beside their reference and are
checked against it (on the CPU with ``TRITON_INTERPRET=1``).
"""

from .reference import lora_linear_reference

lora_linear = lora_linear_reference
"""Functional LoRA layer ``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ``; differentiable in x, lora_A and lora_B."""

__all__ = ["lora_linear", "lora_linear_reference"]
