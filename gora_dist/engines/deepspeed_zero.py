"""DeepSpeed ZeRO-3: each rank owns a flat partition of every weight (which may cut a row), and
after the engine's reduce-scatter the same partition of the averaged gradient
(``deepspeed.utils.safe_get_local_grad``). The only module of gora_dist that imports deepspeed."""

from __future__ import annotations

import contextlib
import copy

import deepspeed
import torch
import torch.nn as nn
from deepspeed.utils import safe_get_local_grad

from ..apply_utils import batch_loss, find_target_modules, to_device
from ..gradients import gradients_only_for
from ..shards import FlatShard

_TRAINING_KEYS = ("optimizer", "scheduler", "train_batch_size")


def estimation_config(ds_config: dict) -> dict:
    """The user's DeepSpeed config for estimation: same ZeRO and precision settings, one micro-batch
    per backward (we feed batches ourselves), no optimizer or scheduler of its own."""
    config = {key: value for key, value in copy.deepcopy(ds_config).items() if key not in _TRAINING_KEYS}
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 2**31 - 1)
    stage = config.setdefault("zero_optimization", {}).setdefault("stage", 3)
    offload = config["zero_optimization"].get("offload_param", {}) or {}
    if offload.get("device", "none") not in ("none", None):
        raise ValueError(
            f"zero_optimization.offload_param.device={offload.get('device')!r}: GoRA estimation reads each rank's "
            "weight partition beside its gradient on the accelerator; estimate without parameter offload"
        )
    if stage != 3:
        raise ValueError(
            f"zero_optimization.stage={stage}: sharded GoRA estimation reads ZeRO-3 gradient partitions; "
            "use stage 3 for estimation (or DDPEngine), then train with any stage"
        )
    return config


class ZeroEngine:
    """``deepspeed.initialize`` on the model with only the target weights trainable and a learning-
    rate-0 SGD that is never stepped (ZeRO-3 needs an optimizer to partition gradients).

    After ``close()`` the model's weights stay ZeRO-3 partitioned: apply the plan to it and call
    ``deepspeed.initialize`` again with the adapters' optimizer to train.
    """

    def __init__(self, model: nn.Module, target_modules, ds_config: dict) -> None:
        self.model = model
        self.targets = find_target_modules(model, target_modules)
        self._stack = contextlib.ExitStack()
        weights = {n: m.weight for n, m in self.targets.items()}
        self._stack.enter_context(gradients_only_for(model, weights))
        optimizer = torch.optim.SGD(list(weights.values()), lr=0.0)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=estimation_config(ds_config))
        self.device = self.engine.device
        self._shards = {}
        for name, module in self.targets.items():
            weight = module.weight
            rows, cols = weight.ds_shape
            shard = FlatShard.even_partition(self.engine.global_rank, self.engine.world_size, rows, cols)
            if weight.ds_tensor.numel() != weight.partition_numel() or shard.numel > weight.partition_numel():
                raise ValueError(f"{name}: ZeRO-3 partition of {weight.partition_numel()} elements is not the even split")
            self._shards[name] = shard

    def shard(self, name: str) -> FlatShard:
        return self._shards[name]

    def local_weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.ds_tensor.detach()[: self._shards[name].numel]

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        return batch_loss(self.engine, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add) -> None:
        self.engine.backward(loss)
        unscale = 1.0
        if self.engine.fp16_enabled():
            unscale = 1.0 / float(self.engine.optimizer.loss_scale)
        for name, module in self.targets.items():
            grad = safe_get_local_grad(module.weight)
            local = grad.reshape(-1)[: self._shards[name].numel]
            add(name, local * unscale if unscale != 1.0 else local)
        self.engine.optimizer.zero_grad()  # next backward copies into the partition instead of adding

    def close(self) -> None:
        try:
            self.engine.destroy()
        finally:
            self._stack.close()
