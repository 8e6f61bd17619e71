"""FSDP2 (``fully_shard``): each rank owns a block of rows of every weight (DTensor Shard(0)), and
after FSDP's reduce-scatter the same rows of the averaged gradient."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.distributed as dist

from ..apply_utils import batch_loss, find_target_modules, to_device, transformer_blocks
from ..gradients import gradients_only_for, target_weight_names
from ..shards import FlatShard


def default_shard_modules(model: nn.Module) -> list:
    """The transformer blocks: modules whose class is in the model's ``_no_split_modules`` (HF)."""
    return list(transformer_blocks(model).values())


class FSDP2Engine:
    """Freezes everything but the target weights and, unless the model is already ``fully_shard``-ed
    (loaded sharded: see ``gora_dist.launcher.sharded_models``), shards each block and the root.

    mesh: a 1-D DeviceMesh (default: the sharded model's, else all ranks on this process's device
    type). shard_modules: the modules to shard one by one before the root (default: the model's
    transformer blocks). Other keyword arguments (``mp_policy``, ``reshard_after_forward``) go to
    ``fully_shard``. The model stays sharded afterwards: apply the plan to it and train it.
    Nothing here holds an unsharded weight, so each is freed as ``fully_shard`` replaces it.
    """

    def __init__(self, model: nn.Module, target_modules, *, mesh=None,
                 shard_modules: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model = model
        self.targets = find_target_modules(model, target_modules)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(gradients_only_for(model, target_weight_names(self.targets)))
        if isinstance(model, FSDPModule):
            if shard_modules is not None or fsdp_kwargs:
                raise ValueError("the model is already fully_shard-ed: shard_modules and fully_shard arguments "
                                 "would be ignored; pass them when sharding it")
            self.mesh = mesh or next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
        else:
            self.mesh = mesh or init_device_mesh(self.device.type, (dist.get_world_size(),))
            for module in (default_shard_modules(model) if shard_modules is None else shard_modules):
                fully_shard(module, mesh=self.mesh, **fsdp_kwargs)
            fully_shard(model, mesh=self.mesh, **fsdp_kwargs)
        self._shards = {name: self._row_shard(name, module.weight) for name, module in self.targets.items()}

    def _row_shard(self, name: str, weight) -> FlatShard:
        from torch.distributed.tensor import Shard

        if tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"{name}: FSDP2 placement {weight.placements} is not supported; GoRA needs Shard(0)")
        rows, cols = weight.shape
        chunk = -(-rows // self.mesh.size())
        first = min(self.mesh.get_local_rank() * chunk, rows)
        local_rows = weight.to_local().shape[0]
        if first + local_rows > rows or local_rows != min(chunk, rows - first):
            raise ValueError(f"{name}: local shard of {local_rows} rows does not follow FSDP2's even row split")
        return FlatShard.row_block(first, local_rows, rows, cols)

    def shard(self, name: str) -> FlatShard:
        return self._shards[name]

    def local_weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.to_local().detach().reshape(-1)

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        return batch_loss(self.model, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add) -> None:
        loss.backward()
        for name, module in self.targets.items():
            grad = module.weight.grad
            if grad is not None:  # None: the loss did not reach this layer (a zero gradient)
                add(name, grad.to_local().reshape(-1))
            module.weight.grad = None

    def close(self) -> None:
        self._stack.close()
