"""The engine interface, and the single-process engine (the degenerate case of every other)."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Protocol

import torch
import torch.nn as nn

from gora_dist.engines.accumulator import gradients_only_for, target_weight_names
from gora_dist.method.shards import FlatShard
from gora_dist.model.devices import model_device, to_device
from gora_dist.model.loss import batch_loss
from gora_dist.model.targets import find_target_modules

AddGrad = Callable[[str, torch.Tensor], None]


class EstimationEngine(Protocol):
    targets: Dict[str, nn.Linear]
    device: Optional[torch.device]

    def shard(self, name: str) -> FlatShard: ...

    def local_weight(self, name: str) -> torch.Tensor: ...

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, add: AddGrad) -> None: ...

    def close(self) -> None: ...


class LocalEngine:
    """One process owns everything. Post-accumulate-grad hooks hand each gradient over and free it
    during backward, so no more than the gradients in flight are held at once."""

    def __init__(self, model: nn.Module, target_modules) -> None:
        self.model = model
        self.targets = find_target_modules(model, target_modules)
        self.device = model_device(model)
        self._add: Optional[AddGrad] = None
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(gradients_only_for(model, target_weight_names(self.targets)))
        for name, module in self.targets.items():
            handle = module.weight.register_post_accumulate_grad_hook(self._hook(name))
            self._stack.callback(handle.remove)

    def _hook(self, name: str):
        def hand_over(param: torch.Tensor) -> None:
            if self._add is not None:
                self._add(name, param.grad.reshape(-1))
            param.grad = None

        return hand_over

    def shard(self, name: str) -> FlatShard:
        return FlatShard.whole(*self.targets[name].weight.shape)

    def local_weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.detach().reshape(-1)

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        return batch_loss(self.model, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add: AddGrad) -> None:
        self._add = add
        try:
            loss.backward()
        finally:
            self._add = None

    def close(self) -> None:
        self._stack.close()
