"""Adapters put into an FSDP2-sharded model stay plain tensors, replicated on every rank (FSDP
manages only the parameters it was given at ``fully_shard``). Their gradients must be averaged over
the ranks like DDP's, or each rank's copy would drift apart silently: one flat all-reduce at the end
of every backward that reached them does it (the average of gradients already averaged by an earlier
micro-batch of the same accumulation is unchanged, so accumulation stays exact)."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch.autograd import Variable


class AveragedReplicas:
    """Hooks on ``params`` (same order and shapes on every rank) whose gradients are averaged over
    ``group`` once per backward. ``remove()`` takes them off."""

    def __init__(self, params: List[torch.nn.Parameter], group=None) -> None:
        self.params, self.group = list(params), group
        self._queued = False
        self._handles = [param.register_post_accumulate_grad_hook(self._on_grad) for param in self.params]

    def _on_grad(self, _param) -> None:
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._average)

    @torch.no_grad()
    def _average(self) -> None:
        self._queued = False
        for param in self.params:  # every rank sends every gradient, zeros where its loss missed one
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        flat = torch.cat([param.grad.reshape(-1).float() for param in self.params])
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        offset = 0
        for param in self.params:
            count = param.grad.numel()
            param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
            offset += count

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def average_beside_shards(model: torch.nn.Module, params: List[torch.nn.Parameter]) -> Optional[AveragedReplicas]:
    """When ``model`` is FSDP2-sharded (a DTensor parameter in it), average ``params`` (replicated
    plain tensors added after ``fully_shard``) over its mesh's group once per backward; else nothing."""
    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    return None if mesh is None else AveragedReplicas(params, group=mesh.get_group())
