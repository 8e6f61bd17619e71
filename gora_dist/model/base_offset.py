"""W ← W − s·B0·A0 on the part of W this rank holds, for the initialisations that move the base
(LoRA-GA, PiSSA): a plain weight whole, an FSDP2 Shard(0) DTensor its rows, a ZeRO-3 parameter its
flat partition. The other ranks' elements are neither formed nor touched."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from gora_dist.method.initializers import shard_base_offset
from gora_dist.method.shards import FlatShard


def own_part(weight: torch.Tensor, name: str):
    """(the writable flat elements this rank holds, their FlatShard)."""
    if hasattr(weight, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
        rows, cols = weight.ds_shape
        shard = FlatShard.even_partition(dist.get_rank(), dist.get_world_size(), rows, cols)
        return weight.ds_tensor.data[:shard.numel], shard
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"{name}: FSDP2 placement {weight.placements}: the base offset needs Shard(0)")
        rows, cols = weight.shape
        chunk = -(-rows // weight.device_mesh.size())
        first = min(weight.device_mesh.get_local_rank() * chunk, rows)
        local = weight.to_local().data
        return local.view(-1), FlatShard.row_block(first, local.shape[0], rows, cols)
    return weight.data.view(-1), FlatShard.whole(*weight.shape)


def offset_base(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, name: str) -> None:
    """Add −s·B0·A0 to the elements of ``weight`` this rank holds, computed in float32 and rounded
    once to the weight's dtype (as PEFT does). A weight that is not floating point (quantised) is
    refused, naming the layer."""
    if not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:
        raise ValueError(f"{name}: the base weight is {weight.dtype}; this initializer rewrites it (W - s·B0·A0) and "
                         "needs a float32/float16/bfloat16 base (quantise the residual afterwards)")
    local, shard = own_part(weight, name)
    with torch.no_grad():
        delta = shard_base_offset(lora_a.to(local.device), lora_b.to(local.device), scaling, shard)
        local.copy_((local.float() + delta).to(local.dtype))


def check_offset_bases(model: nn.Module, weights, initializer: str) -> None:
    """Before anything changes: every base an offset initializer rewrites is materialised and float."""
    for name in weights:
        weight = model.get_submodule(name).weight
        if weight.device.type == "meta" and not hasattr(weight, "ds_tensor"):
            raise ValueError(f"{name}: initializer={initializer} rewrites the base weight, which is on meta here; "
                             "apply the plan after the weights are loaded")
        if not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:
            raise ValueError(f"{name}: the base weight is {weight.dtype}; initializer={initializer} rewrites it "
                             "(W - s·B0·A0) and needs a float32/float16/bfloat16 base")
