"""Model FLOPs of a frozen-base LoRA training step, and model FLOPs utilisation (MFU).

What is counted, per real (not padding) token, PaLM's convention (arXiv 2204.02311, appendix B):
- a frozen linear weight of N parameters: 2N forward + 2N for the input's gradient = **4N** (its own
  gradient is never formed: not the 6N of full training);
- a LoRA adapter of r·(in + out) parameters: forward, input gradient and A/B gradients = **6** per
  parameter;
- attention: 12 · layers · (query heads × head dim) · n per token of an n-token example (QKᵀ and
  AV, forward and both operands' gradients), the whole n × n square as in PaLM (no causal halving);
- the output head (vocabulary × hidden): 4 per parameter, only at the positions the loss counts
  (the useful work, whether the implementation computes logits elsewhere or not).
Not counted: embeddings (a lookup), norms, activations, softmax, the optimizer, recomputation under
activation checkpointing (this is MFU, not hardware FLOPs utilisation), padding positions."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn as nn

PEAK_TFLOPS = (  # (name fragment as torch.cuda.get_device_name reports it, dense bf16/fp16 tensor, fp32)
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),  # SXM; NVL reports its own name and falls here (835 dense bf16): pass --peak-tflops
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("A10G", 70.0, 31.2),
    ("L4", 121.0, 30.3),
)
"""Vendor datasheet peaks without sparsity, TFLOP/s per GPU. Another GPU: ``--peak-tflops``."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula needs from a model (read from module attributes, so it holds for a
    ZeRO-3-partitioned or FSDP2-sharded model too)."""

    linear: int
    """Weights of the frozen linear layers, the output head excepted."""
    head: int
    """Weights of the output head (vocabulary × hidden); 0 where the model has none."""
    adapters: int
    """LoRA parameters, r · (in + out) summed over the adapted layers."""
    layers: int
    attention_width: int
    """Query heads × head dimension (the width QKᵀ and AV are computed at)."""
    dtype: torch.dtype
    """The frozen weights' dtype (which peak applies)."""


def step_flops(shape: ModelShape, real_tokens: int, squared_lengths: int, trained_tokens: int) -> float:
    """Model FLOPs of one training step over examples of lengths n_i: ``real_tokens`` = Σ n_i,
    ``squared_lengths`` = Σ n_i², ``trained_tokens`` the positions the loss counts."""
    return (4 * shape.linear * real_tokens + 6 * shape.adapters * real_tokens
            + 12 * shape.layers * shape.attention_width * squared_lengths + 4 * shape.head * trained_tokens)


def model_shape(model: nn.Module) -> ModelShape:
    """The model's :class:`ModelShape` (GoRA's layers: their base counts as frozen, their ranks as adapters)."""
    from gora_dist.model.layers import GoRALinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else None
    linear = adapters = 0
    dtype = None
    for module in model.modules():
        if isinstance(module, GoRALinear):
            adapters += module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear) and module is not head:
            linear += module.in_features * module.out_features
            dtype = dtype or module.weight.dtype
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
    return ModelShape(linear=linear, head=head.in_features * head.out_features if head is not None else 0,
                      adapters=adapters, layers=getattr(config, "num_hidden_layers", 0),
                      attention_width=heads * head_dim, dtype=dtype or torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> Tuple[Optional[float], str]:
    """(peak FLOP/s of one device or None, where it came from): ``override_tflops`` when given, else
    the GPU's datasheet figure for ``dtype`` (bf16/fp16 tensor cores, or fp32), else None (a CPU, or a
    GPU not in :data:`PEAK_TFLOPS`)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for the CPU (--peak-tflops gives one)"
    name = torch.cuda.get_device_name(device)
    for fragment, tensor, fp32 in PEAK_TFLOPS:
        if fragment in name:
            low = dtype in (torch.bfloat16, torch.float16)
            return (tensor if low else fp32) * 1e12, f"{name} datasheet, {'bf16/fp16 dense' if low else 'fp32'}"
    return None, f"no peak known for {name!r} (--peak-tflops gives one)"
