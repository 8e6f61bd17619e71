"""``--quantization nf4 | fp4 | int8``: the base model loaded quantised by bitsandbytes (QLoRA), its
compute dtype the run's precision. GoRA reads such a base without a weight gradient
(``engines/output_tap``) and leaves it as it is; the adapters train in float32 beside it.

Each rank holds the whole quantised model (local, ddp): the engines that shard the base (fsdp2,
zero3, zero2) are refused before any process group starts."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
import torch.nn as nn

from gora_dist.launcher.model_sources import TINY_MODELS

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
QUANT_STORAGES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED_ENGINES = ("auto", "local", "ddp")


def quantization_refusal(quantization: str, quant_storage: str, engine: str, task: str, model: str) -> Optional[str]:
    """Why these options cannot go together, or None (checked with the rest of the run's config)."""
    if quantization not in QUANTIZATIONS:
        return f"quantization={quantization!r} is not one of {list(QUANTIZATIONS)}"
    if quant_storage not in QUANT_STORAGES:
        return f"quant_storage={quant_storage!r} is not one of {list(QUANT_STORAGES)}"
    if quantization == "none":
        return None
    if quant_storage != "uint8" and quantization == "int8":
        return f"quant_storage={quant_storage!r} is for 4-bit weights (nf4, fp4); int8 stores int8"
    if engine not in QUANTIZED_ENGINES:
        return (f"quantization={quantization} with engine={engine}: the launcher loads a quantised model whole on "
                "each rank (bitsandbytes quantises as it loads; the sharded loaders read rows of float files), so it "
                "runs under ddp (several processes) or local; pass --engine ddp")
    if task == "seq-cls":
        return "quantization is for causal LMs (task causal-lm or sft): a new classification head would be quantised too"
    if model in TINY_MODELS:
        return f"quantization with model={model!r}: the tiny test models are built, not loaded; save one to a folder"
    return None


def bnb_config(quantization: str, quant_storage: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for the options (nf4 with double quantisation, as QLoRA)."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (transformers' own message is about the GPU)
    except ImportError:
        raise ValueError(f"quantization={quantization} needs bitsandbytes: pip install bitsandbytes "
                         "(or pip install -e '.[qlora]')") from None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=quantization == "nf4",
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=QUANT_STORAGES[quant_storage])


def load_quantized(auto, folder: str, extra: dict, *, dtype: torch.dtype, quantization, device: torch.device,
                   **head) -> nn.Module:
    """``auto.from_pretrained`` of the folder, quantised on ``device`` (bitsandbytes quantises as it
    places the weights). A GGUF checkpoint (the packaged SmolLM2) cannot be quantised on load by
    transformers: it is dequantised as always, written once as safetensors to a temporary folder,
    and that folder is loaded quantised."""
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    if "gguf_file" not in extra:
        return auto.from_pretrained(folder, dtype=dtype, quantization_config=quantization, device_map=device_map,
                                    **head, **extra)
    dense = auto.from_pretrained(folder, dtype=dtype, **head, **extra)
    dense.hf_quantizer = None  # GGUF weights are dequantised on load: nothing of GGUF's stays in the folder
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    with tempfile.TemporaryDirectory(prefix="gora-gguf-") as staging:
        dense.save_pretrained(staging)
        del dense
        model = auto.from_pretrained(staging, dtype=dtype, quantization_config=quantization, device_map=device_map, **head)
        model.config._name_or_path = os.path.basename(folder)
    return model
