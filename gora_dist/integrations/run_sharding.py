"""How a Trainer / accelerate run shards the model, read from its arguments, its Accelerator or
accelerate's environment (ZeRO-3's config, the FSDP version, FSDP2's mixed precision), and that
FSDP2 sharding applied: so GoRA estimates on the model as the run's engine will hold it."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn


def zero3_config(args) -> Optional[dict]:
    """The HF DeepSpeed config when the run uses ZeRO-3 (the model is then loaded partitioned)."""
    hf_config = getattr(args, "hf_deepspeed_config", None) if args is not None else None
    if hf_config is None or not hf_config.is_zero3():
        return None
    config = {key: value for key, value in hf_config.config.items() if value != "auto"}
    config["zero_optimization"] = {k: v for k, v in hf_config.config.get("zero_optimization", {}).items() if v != "auto"}
    for precision in ("bf16", "fp16"):
        if isinstance(config.get(precision), dict):
            config[precision] = {k: v for k, v in config[precision].items() if v != "auto"}
    return config


def fsdp_version(args, accelerator) -> Optional[int]:
    """1 or 2 when the run shards with FSDP (TrainingArguments ``fsdp``/``fsdp_config``, an
    Accelerator's FSDP plugin, or ``accelerate launch``'s environment), else None."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None) if accelerator is not None else None
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    if args is not None and getattr(args, "fsdp", None):
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def on_cpu(args, accelerator) -> bool:
    """accelerate enables FSDP for accelerator devices only (a CPU run is MULTI_CPU, wrapped in DDP)."""
    device = getattr(accelerator, "device", None) if accelerator is not None else getattr(args, "device", None)
    return device is not None and torch.device(device).type == "cpu"


def fsdp2_policy(args, accelerator):
    """FSDP2's mixed precision for the run: the Accelerator's own policy, else bf16/fp16 compute with
    float32 reduction when the run asks for it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from gora_dist.engines.fsdp2 import mixed_precision

    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None) if accelerator is not None else None
    policy = getattr(plugin, "mixed_precision_policy", None)
    if isinstance(policy, MixedPrecisionPolicy):
        return policy
    mixed = getattr(accelerator, "mixed_precision", None) if accelerator is not None else None
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    if half is None and args is not None:
        half = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    return mixed_precision(half)


def shard_fsdp2(model: nn.Module, args, accelerator) -> None:
    """fully_shard the blocks, the embeddings and the root as the run's FSDP2 would (unless the
    model is sharded already)."""
    from torch.distributed.fsdp import FSDPModule

    from gora_dist.engines.fsdp2 import fully_shard_model

    settings = {"mp_policy": fsdp2_policy(args, accelerator)}  # what accelerate would pass
    config = (getattr(args, "fsdp_config", None) or {}) if args is not None else {}
    if "reshard_after_forward" in config:
        settings["reshard_after_forward"] = bool(config["reshard_after_forward"])
    if not isinstance(model, FSDPModule):
        fully_shard_model(model, **settings)
    name_sharded_blocks(model, args, accelerator)


def sharded_block_names(model: nn.Module, names, given: bool = True) -> list:
    """``names`` (block class names, e.g. ``LlamaDecoderLayer``) as the sharded model spells them:
    ``fully_shard`` swaps each block's class for ``FSDP<name>``. Names found neither way are kept
    when the user ``given`` them (accelerate then names them in its error), dropped when they came
    from ``_no_split_modules`` (which can name classes a model does not build)."""
    present = {type(module).__name__ for module in model.modules()}
    found = []
    for name in names:
        if name in present or (given and f"FSDP{name}" not in present):
            found.append(name)
        elif f"FSDP{name}" in present:
            found.append(f"FSDP{name}")
    return found


def name_sharded_blocks(model: nn.Module, args, accelerator) -> None:
    """Tell accelerate the block classes by the names they carry once sharded. accelerate looks the
    wrap classes up by name before it sees the model is an FSDPModule, and ``LlamaDecoderLayer`` is
    ``FSDPLlamaDecoderLayer`` by then: accelerate 1.15 stops with "Could not find the transformer
    layer class" (1.16 skips the name). Only names that would not resolve are changed."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None) if accelerator is not None else None
    plugin_args = getattr(args, "fsdp_plugin_args", None) if args is not None else None
    if plugin is not None:
        given = plugin.transformer_cls_names_to_wrap
        names = list(getattr(model, "_no_split_modules", None) or []) if given is None else list(given)
        plugin.transformer_cls_names_to_wrap = sharded_block_names(model, names, given is not None) or None
    if isinstance(plugin_args, dict) and plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") == "TRANSFORMER_BASED_WRAP":
        given = plugin_args.get("transformer_cls_names_to_wrap")
        names = given.split(",") if given else list(getattr(model, "_no_split_modules", None) or [])
        names = sharded_block_names(model, names, bool(given))
        if names:
            plugin_args["transformer_cls_names_to_wrap"] = ",".join(names)
    if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):  # `accelerate launch` with an FSDP config
        names = sharded_block_names(model, os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","))
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(names)
