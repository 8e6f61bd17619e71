"""Quantised linear layers as GoRA targets: which ones GoRA can read, their real (out, in), and their
weight dequantised one layer at a time.

bitsandbytes' ``Linear4bit`` (nf4 / fp4, double quantisation, any ``quant_storage``) and
``Linear8bitLt`` subclass ``nn.Linear`` but hold packed weights: ``weight.shape`` is the packed
buffer's ((out·in/2, 1) for 4 bits), the weight never gets a gradient, and it cannot require one.
GoRA takes their gradient from each layer's own backward instead (``engines/output_tap``) and reads
W here only to score the layer. Other quantisers (GPTQ, AWQ, HQQ, torchao, quanto, ...) are refused
by name: their weights are packed in ways we do not read.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

BNB_4BIT = "bitsandbytes 4-bit"
BNB_8BIT = "bitsandbytes 8-bit"

# module-path prefixes of quantisation libraries whose layers GoRA cannot read, and their names
_OTHER_QUANTISERS = {
    "auto_gptq": "GPTQ (auto-gptq)", "gptqmodel": "GPTQ (gptqmodel)", "optimum.gptq": "GPTQ (optimum)",
    "awq": "AWQ", "hqq": "HQQ", "torchao": "torchao", "optimum.quanto": "quanto", "quanto": "quanto",
    "compressed_tensors": "compressed-tensors", "aqlm": "AQLM", "eetq": "EETQ", "fbgemm_gpu": "FBGEMM FP8",
    "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR", "bitnet": "BitNet",
}


def quantized_kind(module: nn.Module) -> Optional[str]:
    """``BNB_4BIT`` or ``BNB_8BIT`` for bitsandbytes' quantised linear layers, else None.
    By class path, so bitsandbytes is imported only where the model already did."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return BNB_4BIT
            if cls.__name__ == "Linear8bitLt":
                return BNB_8BIT
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


def _quantiser_of(obj) -> Optional[str]:
    path = type(obj).__module__
    for prefix, name in _OTHER_QUANTISERS.items():
        if path == prefix or path.startswith(prefix + "."):
            return name
    return None


def unreadable_reason(name: str, module: nn.Module) -> Optional[str]:
    """Why GoRA cannot adapt ``module`` (a layer matched by target_modules), or None when it can: a
    plain float ``nn.Linear`` or a bitsandbytes layer it reads. Names the layer, its type and what to do."""
    kind = quantized_kind(module)
    if kind == BNB_4BIT:
        state = quant_state(module)
        if state is None:
            return f"{name}: a bitsandbytes Linear4bit whose weight is not quantised yet (no quant_state); load the " \
                   "model with its BitsAndBytesConfig (or move it to its device) before GoRA"
        if getattr(state, "packing_format_for_cpu", False):
            return (f"{name}: this Linear4bit's weight was repacked by bitsandbytes' CPU inference path (an eval-mode "
                    "forward without gradients), which GoRA does not read; run GoRA before evaluating the model, or "
                    "load it again")
        return None
    if kind == BNB_8BIT:
        if module.weight.dtype == torch.int8 and getattr(module.weight, "SCB", None) is None \
                and getattr(getattr(module, "state", None), "SCB", None) is None:
            return f"{name}: a bitsandbytes Linear8bitLt without its scales (SCB); load the model with its BitsAndBytesConfig"
        return None
    quantiser = _quantiser_of(module) or _quantiser_of(getattr(module, "weight", None))
    if quantiser is not None:
        return (f"{name} is a {type(module).__name__} ({quantiser} quantisation), which GoRA cannot read; GoRA adapts "
                "plain nn.Linear layers and bitsandbytes 4-bit / 8-bit layers (BitsAndBytesConfig, QLoRA)")
    if not isinstance(module, nn.Linear):
        return f"{name} matches target_modules but is a {type(module).__name__}; GoRA adapts nn.Linear layers only"
    weight = module.weight
    if not (weight.dtype.is_floating_point or weight.device.type == "meta"):
        return (f"{name}: an nn.Linear with a {weight.dtype} weight ({type(weight).__name__}), a quantisation GoRA "
                "cannot read; GoRA adapts float nn.Linear layers and bitsandbytes 4-bit / 8-bit layers")
    return None


def quant_state(module: nn.Module):
    """A 4-bit layer's quantisation state: on its weight, or (an FSDP2 shard, which loses the weight's
    attributes) on the module, where bitsandbytes keeps a copy."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def linear_shape(module: nn.Module) -> Tuple[int, int]:
    """(out, in) of a linear layer, quantised or not (a packed weight's shape is not the layer's)."""
    if is_quantized(module):
        return int(module.out_features), int(module.in_features)
    return tuple(module.weight.shape)


@torch.no_grad()
def dequantized_weight(module: nn.Module, packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W (out, in) in float32, one layer at a time: a bitsandbytes layer's weight dequantised, a plain
    layer's weight as it is. The caller frees it before the next layer's. packed: the 4-bit buffer
    when the module's own weight is not it (an FSDP2 shard: pass the gathered buffer); the quant
    state is then the module's (bitsandbytes keeps it there for such cases)."""
    kind = quantized_kind(module)
    weight = module.weight
    if kind == BNB_4BIT:
        import bitsandbytes.functional as bnb_functional

        state = quant_state(module)
        data = weight.data if packed is None else packed.detach()
        return bnb_functional.dequantize_4bit(data, state).float().reshape(linear_shape(module))
    if kind == BNB_8BIT and weight.dtype == torch.int8:
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return weight.data.float() * (scales.float().reshape(-1, 1) / 127.0)  # LLM.int8's row-wise absmax scales
    return weight.detach().float()


def quantized_offset_refusal(targets, initializer: str) -> Optional[str]:
    """Why ``initializer`` cannot run on these targets, or None: LoRA-GA and PiSSA start from
    W − s·B0·A0, a new base weight that a quantised layer could hold only re-quantised (rounded
    again, no longer the model that was loaded); GoRA and LoRA-One leave the base as it is."""
    if initializer not in ("lora_ga", "pissa"):
        return None
    quantized = [name for name, module in targets.items() if is_quantized(module)]
    if not quantized:
        return None
    return (f"initializer={initializer} offsets the base weights (W - s*B0*A0), and {quantized[0]} "
            f"{'and ' + str(len(quantized) - 1) + ' more ' if len(quantized) > 1 else ''}is quantised "
            f"({quantized_kind(targets[quantized[0]])}): the offset base would have to be quantised again; use "
            "initializer='gora' or 'lora_one', which leave the base untouched")
