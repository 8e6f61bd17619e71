"""The run's model as its engine holds it, loaded once for GoRA's estimation and for training:
FSDP2-sharded (each rank its own shards), ZeRO-3-partitioned while loading, or whole on this
rank's device (local, ddp, zero2). The mechanics of sharded loading: launcher/sharded_models.py."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.model_sources import TINY_MODELS
from gora_dist.launcher.models import enable_gradient_checkpointing, load_model
from gora_dist.launcher.processes import Setup, deepspeed_config
from gora_dist.launcher.quantization import bnb_config
from gora_dist.launcher.tasks import Task
from gora_dist.memory_trace import phase


@contextlib.contextmanager
def loaded_model(config: TrainConfig, task: Task, setup: Setup) -> Iterator[nn.Module]:
    """The model, in eval mode; under ZeRO-3 the object that makes transformers load partitioned
    stays alive until the block ends (transformers holds it by a weak reference)."""
    zero3_config = None
    if setup.engine == "zero3" and config.model not in TINY_MODELS:  # the random test models are built, not loaded
        from gora_dist.launcher.sharded_models import keep_zero3_loading

        zero3_config = deepspeed_config(config, setup, 3)
        zero3_loading = keep_zero3_loading(zero3_config)  # noqa: F841 (lives until the block ends)
    phase("load")
    torch.manual_seed(config.seed)  # a new classification head starts the same on every rank
    model = _load(config, task, setup, zero3_config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    yield model


def _load(config: TrainConfig, task: Task, setup: Setup, zero3_config: Optional[dict]) -> nn.Module:
    labels = tuple(getattr(task, "label_names", ("negative", "positive")))
    options = dict(task=config.task, labels=labels, precision=config.precision, max_length=config.max_length)
    if setup.engine == "fsdp2":
        from gora_dist.engines.fsdp2 import fully_shard_model, mixed_precision
        from gora_dist.launcher.sharded_models import load_fsdp2

        def shard(model: nn.Module) -> None:  # each transformer block and the embeddings, then the root
            fully_shard_model(model, mp_policy=mixed_precision(torch.bfloat16 if config.precision == "bf16" else None))

        return load_fsdp2(config.model, shard, setup.device, say=setup.say, **options)
    if setup.engine == "zero3":
        from gora_dist.launcher.sharded_models import load_zero3

        return load_zero3(config.model, zero3_config, say=setup.say, **options)
    if config.quantization != "none":  # bitsandbytes quantises as it places the weights on the device
        compute = torch.bfloat16 if config.precision == "bf16" else torch.float32
        quantization = bnb_config(config.quantization, config.quant_storage, compute)
        return load_model(config.model, quantization=quantization, device=setup.device, **options)
    return load_model(config.model, **options).to(setup.device)  # local, ddp, zero2: the whole model per rank
