"""The engine interface, and the single-process engine (the degenerate case of every other)."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Protocol

import torch
import torch.nn as nn

from gora_dist.engines.accumulator import gradients_only_for, target_weight_names
from gora_dist.engines.output_tap import OutputTaps
from gora_dist.method.shards import FlatShard
from gora_dist.model.devices import model_device, to_device
from gora_dist.model.loss import batch_loss
from gora_dist.model.quantized import dequantized_weight, is_quantized, linear_shape, quantized_kind
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


def split_quantized(targets: Dict[str, nn.Module]):
    """({name: dense target}, {name: quantised target}): the first get weight gradients, the second
    output taps (``engines/output_tap``)."""
    quantized = {name: module for name, module in targets.items() if is_quantized(module)}
    return {name: module for name, module in targets.items() if name not in quantized}, quantized


def refuse_quantized(targets: Dict[str, nn.Module], engine: str, why: str) -> None:
    """Raise on every rank alike (before any collective) when an engine cannot read quantised targets."""
    quantized = [name for name, module in targets.items() if is_quantized(module)]
    if quantized:
        raise ValueError(f"{quantized[0]} is a quantised layer ({quantized_kind(targets[quantized[0]])}) and the "
                         f"estimation engine is {engine}: {why}; estimate with DDP (each rank holds the quantised "
                         "model: engine='ddp') or on one process")


class LocalEngine:
    """One process owns everything. Post-accumulate-grad hooks hand each gradient over and free it
    during backward, so no more than the gradients in flight are held at once; a quantised target's
    gradient comes from its output tap the same way."""

    def __init__(self, model: nn.Module, target_modules) -> None:
        self.model = model
        self.targets = find_target_modules(model, target_modules)
        self.device = model_device(model)
        self._add: Optional[AddGrad] = None
        self._stack = contextlib.ExitStack()
        dense, quantized = split_quantized(self.targets)
        self._stack.enter_context(gradients_only_for(model, target_weight_names(dense)))
        for name, module in dense.items():
            handle = module.weight.register_post_accumulate_grad_hook(self._hook(name))
            self._stack.callback(handle.remove)
        if quantized:
            self._stack.callback(OutputTaps(model, quantized, self._hand_over).close)

    def _hand_over(self, name: str, grad: torch.Tensor) -> None:
        if self._add is not None:
            self._add(name, grad.reshape(-1))

    def _hook(self, name: str):
        def hand_over(param: torch.Tensor) -> None:
            if self._add is not None:
                self._add(name, param.grad.reshape(-1))
            param.grad = None

        return hand_over

    def shard(self, name: str) -> FlatShard:
        return FlatShard.whole(*linear_shape(self.targets[name]))

    def local_weight(self, name: str) -> torch.Tensor:
        module = self.targets[name]
        return (dequantized_weight(module) if is_quantized(module) else module.weight.detach()).reshape(-1)

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
