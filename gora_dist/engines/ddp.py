"""DDP: every rank has the full gradient after DDP's all-reduce (the mean over ranks). GoRA's
math must count each element once across ranks, so each rank takes an even flat partition of it
(as ZeRO-3 would): the float32 sums and the B0 products shrink with the world size too.

A quantised target (each rank holds the whole 4-bit model) has no weight gradient for DDP to
reduce: its output tap's gᵀx is reduce-scattered in float32 to the owners of the same partitions as
the backward makes it. A model whose targets are all quantised is not wrapped in DDP at all (DDP
refuses a model with nothing to reduce)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from gora_dist.comm.reduce import owned_mean
from gora_dist.engines.accumulator import gradients_only_for, target_weight_names
from gora_dist.engines.base import split_quantized
from gora_dist.engines.output_tap import OutputTaps
from gora_dist.method.shards import FlatShard
from gora_dist.model.devices import model_device, to_device
from gora_dist.model.loss import batch_loss
from gora_dist.model.quantized import dequantized_weight, linear_shape
from gora_dist.model.targets import find_target_modules


class DDPEngine:
    """Wraps the model in DDP after freezing everything but the target weights (DDP decides at
    construction which parameters it reduces). ``ddp_kwargs`` go to DistributedDataParallel."""

    def __init__(self, model: nn.Module, target_modules, **ddp_kwargs) -> None:
        self.model = model
        self.targets = find_target_modules(model, target_modules)
        self.device = model_device(model)
        self._stack = contextlib.ExitStack()
        self._dense, self._quantized = split_quantized(self.targets)
        self._stack.enter_context(gradients_only_for(model, target_weight_names(self._dense)))
        ddp_kwargs.setdefault("gradient_as_bucket_view", True)  # the gradients live in DDP's buckets, not beside them
        if self.device is not None and self.device.type == "cuda" and "device_ids" not in ddp_kwargs:
            ddp_kwargs["device_ids"] = [self.device]
        self.wrapped = DistributedDataParallel(model, **ddp_kwargs) if self._dense else model
        rank, world = dist.get_rank(), dist.get_world_size()
        self._shards = {name: FlatShard.even_partition(rank, world, *linear_shape(m)) for name, m in self.targets.items()}
        self._add = None
        if self._quantized:
            self._stack.callback(OutputTaps(model, self._quantized, self._reduce_and_hand_over).close)

    def _reduce_and_hand_over(self, name: str, grad: torch.Tensor) -> None:
        """A quantised target's full local gradient: this rank's partition of the rank mean, at once."""
        shard = self._shards[name]
        partition = -(-(shard.rows * shard.cols) // dist.get_world_size())
        owned = owned_mean(grad, partition, shard.numel)
        if self._add is not None:
            self._add(name, owned)

    def shard(self, name: str) -> FlatShard:
        return self._shards[name]

    def _owned(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        shard = self._shards[name]
        return tensor.reshape(-1)[shard.start:shard.stop]

    def local_weight(self, name: str) -> torch.Tensor:
        if name in self._quantized:  # dequantised one layer at a time, then this rank's part of it
            return self._owned(name, dequantized_weight(self._quantized[name])).clone()
        return self._owned(name, self.targets[name].weight.detach())

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        return batch_loss(self.wrapped, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add) -> None:
        self._add = add
        try:
            loss.backward()
        finally:
            self._add = None
        for name, module in self._dense.items():
            if module.weight.grad is not None:  # None: the loss did not reach this layer (a zero gradient)
                add(name, self._owned(name, module.weight.grad))
            module.weight.grad = None

    def close(self) -> None:
        del self.wrapped
        self._stack.close()
