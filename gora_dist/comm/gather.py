"""Full copies of parameters however an engine holds them (plain, FSDP2 DTensor shards, or ZeRO-3
partitions), and the way back: writing a full value into such a parameter. A collective when
sharded (every rank calls it; every rank gets, or gives, full tensors)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

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


@torch.no_grad()
def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a parameter, however it is held, to ``value`` (the same full tensor on every rank): a
    DTensor keeps its own shard of it, a ZeRO-3 parameter is gathered, set and re-partitioned. A
    meta tensor is left alone (nothing to write into yet)."""
    if param.device.type == "meta":
        return
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = value.to(device=param.device, dtype=param.dtype)
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
    elif hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(value)
    else:
        param.copy_(value)


def gather_partitions(parts: List[Tuple[str, torch.Tensor, Sequence[int]]], rank: int, world: int) -> Dict[str, torch.Tensor]:
    """Full float32 CPU tensors on rank 0 only, from every rank's flat partition of each (equal length
    on every rank, the last one padded, as ZeRO-3 partitions are), in one ``gather``; {} elsewhere.
    parts: (name, this rank's partition, full shape), in the same order on every rank."""
    import torch.distributed as dist

    flat = torch.cat([local.reshape(-1).float() for _, local, _ in parts]) if parts else torch.zeros(0)
    bucket = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
    dist.gather(flat, bucket, dst=0)
    if rank != 0:
        return {}
    stacked = torch.stack(bucket).cpu()  # (world, all partitions)
    full, offset = {}, 0
    for name, local, shape in parts:
        count = local.numel()
        full[name] = stacked[:, offset:offset + count].reshape(-1)[:math.prod(shape)].view(*shape).clone()
        offset += count
    return full
