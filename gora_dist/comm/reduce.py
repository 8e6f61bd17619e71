"""The one reduction GoRA runs inside a backward: a layer's full gradient, reduce-scattered in float32
to this rank's part of the rank average. Shared by the engines that take each gradient as the
backward produces it (ZeRO-3, FSDP2), so neither holds more than the gradient in flight."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def owned_mean(grad: torch.Tensor, partition: int, owned: int, *, group: Optional[dist.ProcessGroup] = None,
               divide_by: float = 1.0) -> torch.Tensor:
    """This rank's ``owned`` leading elements of its ``partition``-element chunk of the flat gradient,
    summed over the group's ranks and divided by ``world × divide_by``, in float32.

    The flat gradient is padded at the end to ``partition × world`` (the split both ZeRO-3's flat
    partitions and FSDP2's padded row blocks follow); a shorter last part is ``owned < partition``.
    """
    world = dist.get_world_size(group)
    flat = grad.reshape(-1).float()
    if partition * world != flat.numel():
        flat = F.pad(flat, (0, partition * world - flat.numel()))
    local = torch.empty(partition, dtype=torch.float32, device=flat.device)
    dist.reduce_scatter_tensor(local, flat, group=group)
    return local[:owned].mul_(1.0 / (world * divide_by))
