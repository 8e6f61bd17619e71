"""Full copies of parameters however an engine holds them: plain, FSDP2 DTensor shards, or ZeRO-3
partitions. A collective when sharded (every rank calls it, every rank gets full tensors)."""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn


def full_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A full float32 CPU copy of a plain tensor or an FSDP2 DTensor (a collective for the latter)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().to("cpu", torch.float32)


def full_parameters(model: nn.Module, wanted: Callable[[str], bool]) -> Dict[str, torch.Tensor]:
    """{name: full float32 CPU tensor} for the parameters whose name ``wanted`` accepts."""
    named = [(name, param) for name, param in model.named_parameters() if wanted(name)]
    partitioned = [param for _, param in named if hasattr(param, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {name: param.detach().to("cpu", torch.float32).clone() for name, param in named}
    return {name: full_copy(param) for name, param in named}


def under(prefixes) -> Callable[[str], bool]:
    """A name filter: parameters of the modules called ``prefixes``."""
    prefixes = tuple(f"{p}." for p in prefixes)
    return lambda name: name.startswith(prefixes)
