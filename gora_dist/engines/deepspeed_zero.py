"""DeepSpeed ZeRO-3: each rank owns a flat partition of every weight (which may cut a row) and
takes the same partition of the rank-averaged gradient. The only module of gora_dist that imports
deepspeed.

Estimation uses ZeRO-3's parameter partitioning alone (``DeepSpeedZeRoOffload``, the part of the
engine that gathers each layer's weights for its forward and backward and frees them after), not
``deepspeed.initialize``: the engine needs an optimizer to partition gradients, and any optimizer
makes it allocate float32 master copies of the target partitions and a gradient-partition buffer
that GoRA never reads (about 103 GB per rank at 70B). Instead a hook takes each target weight's
gradient as the backward produces it (the layer's full gradient, while its weights are gathered),
reduce-scatters it in float32 to this rank's partition, hands that over and frees the gradient: one
layer's gradient at a time, besides GoRA's own float32 sums of 1/world of the targets.
"""

from __future__ import annotations

import contextlib
import copy

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload, ZeROOrderedDict

from gora_dist.comm.reduce import owned_mean
from gora_dist.engines.accumulator import gradients_only_for, target_weight_names
from gora_dist.engines.base import refuse_quantized
from gora_dist.method.shards import FlatShard
from gora_dist.model.devices import to_device
from gora_dist.model.loss import batch_loss
from gora_dist.model.targets import find_target_modules

_TRAINING_KEYS = ("optimizer", "scheduler", "train_batch_size")
# what DeepSpeedZeRoOffload leaves on each module; left in place, a later deepspeed.initialize
# would reuse these closures, which call back into the (destroyed) estimation offload
_MODULE_STATE = ("pre_bwd_fn", "post_bwd_fn", "ds_grads_remaining", "applied_pre_backward_ref_cnt",
                 "ds_inflight_param_registry")


def estimation_config(ds_config: dict) -> dict:
    """The user's DeepSpeed config for estimation: same ZeRO and precision settings, one micro-batch
    per backward (we feed batches ourselves), no optimizer or scheduler."""
    config = {key: value for key, value in copy.deepcopy(ds_config).items() if key not in _TRAINING_KEYS}
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
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


def _half_dtype(config: dict):
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (config.get(key) or {}).get("enabled"):
            return dtype
    return None


def static_loss_scale(config: dict) -> float:
    """fp16 only: the loss is multiplied by this before backward (DeepSpeed's static ``loss_scale``
    or its dynamic scaler's initial value, 2**initial_scale_power) and each gradient divided by it
    after the float32 reduction; 1 otherwise. An overflow shows as a non-finite gradient, which
    estimation reports with the step and layer."""
    fp16 = config.get("fp16") or {}
    if not fp16.get("enabled"):
        return 1.0
    return float(fp16.get("loss_scale") or 0) or 2.0 ** int(fp16.get("initial_scale_power", 16))


class ZeroEngine:
    """ZeRO-3 parameter partitioning around the model, with only the target weights requiring grad.

    A model loaded under ``deepspeed.zero.Init`` (transformers' ``HfDeepSpeedConfig``) stays as it
    is; a plain one is partitioned here, after a cast to the config's bf16/fp16 as
    ``deepspeed.initialize`` would do. After ``close()`` the weights stay ZeRO-3 partitioned and no
    hook of this engine is left: apply the plan to the same model and call ``deepspeed.initialize``
    with the adapters' optimizer to train.
    """

    def __init__(self, model: nn.Module, target_modules, ds_config: dict) -> None:
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.utils.timer import NoopTimer

        config = estimation_config(ds_config)
        zero = DeepSpeedConfig(config).zero_config
        self.model = model
        self.targets = find_target_modules(model, target_modules)
        refuse_quantized(self.targets, "ZeRO-3", "transformers loads a quantised model whole on every rank, outside "
                         "zero.Init, and DeepSpeed's partitioning of packed 4-bit weights is not one GoRA reads")
        self.loss_scale = static_loss_scale(config)
        half = _half_dtype(config)
        if half is not None and not any(hasattr(p, "ds_id") for p in model.parameters()):
            model.to(half)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(gradients_only_for(model, target_weight_names(self.targets)))
        self._stack.callback(self._forget_offload)
        self._offload = DeepSpeedZeRoOffload(
            model, timers=NoopTimer(), ds_config=config, overlap_comm=zero.overlap_comm,
            prefetch_bucket_size=zero.prefetch_bucket_size, max_reuse_distance=zero.max_reuse_distance,
            max_live_parameters=zero.max_live_parameters, param_persistence_threshold=zero.param_persistence_threshold,
            model_persistence_threshold=zero.model_persistence_threshold)
        self.device = torch.device(deepspeed.get_accelerator().current_device_name())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._add = None
        self._shards = {}
        for name, module in self.targets.items():
            weight = module.weight
            rows, cols = weight.ds_shape
            shard = FlatShard.even_partition(self.rank, self.world, rows, cols)
            if weight.ds_tensor.numel() != weight.partition_numel() or shard.numel > weight.partition_numel():
                raise ValueError(f"{name}: ZeRO-3 partition of {weight.partition_numel()} elements is not the even split")
            self._shards[name] = shard
            handle = weight.register_post_accumulate_grad_hook(self._hand_over(name))
            self._stack.callback(handle.remove)

    def _hand_over(self, name: str):
        shard = self._shards[name]

        def reduce_and_hand_over(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            if self._add is not None:
                self._add(name, owned_mean(grad, param.partition_numel(), shard.numel, divide_by=self.loss_scale))

        return reduce_and_hand_over

    def shard(self, name: str) -> FlatShard:
        return self._shards[name]

    def local_weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.ds_tensor.detach()[: self._shards[name].numel]

    @contextlib.contextmanager
    def _external_parameters(self):
        """What the DeepSpeed engine's forward does around the module: lets ZeRO-3 find parameters a
        module uses but does not own (tied or shared weights)."""
        dicts = [m._parameters for m in self.model.modules() if isinstance(m._parameters, ZeROOrderedDict)]
        for parameters in dicts:
            parameters._in_forward = True
        try:
            yield
        finally:
            for parameters in dicts:
                parameters._in_forward = False

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        with self._external_parameters():
            return batch_loss(self.model, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add) -> None:
        self._add = add
        try:
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        finally:
            self._add = None
            self._offload.partition_all_parameters()  # what the backward left gathered

    def _forget_offload(self) -> None:
        offload, self._offload = getattr(self, "_offload", None), None
        if offload is None:
            return
        offload.destroy()
        for module in self.model.modules():
            for attribute in _MODULE_STATE:
                module.__dict__.pop(attribute, None)

    def close(self) -> None:
        self._stack.close()

