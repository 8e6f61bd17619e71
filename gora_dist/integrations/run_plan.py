"""The plan for a Trainer / accelerate run, shared by ``prepare_trainer``, ``prepare_gora`` and
``prepare_gora_peft``: the engine the run trains with (read from its arguments or Accelerator),
FSDP2 sharding applied as the run would, then GoRA's estimation on the batches given, or a saved
plan read back when resuming."""

from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional, Tuple

import torch.distributed as dist
import torch.nn as nn

from gora_dist.config import GoRAConfig
from gora_dist.engines.choice import choose_engine
from gora_dist.integrations.run_sharding import fsdp_version, on_cpu, shard_fsdp2, zero3_config
from gora_dist.model.adapter_io import load_plan
from gora_dist.model.quantized import is_quantized
from gora_dist.report import GoRAPlan


def rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_engine(model: nn.Module, *, args, accelerator, engine: str = "auto") -> Tuple[str, dict]:
    """(engine, its extra estimate_plan arguments) for the run: ZeRO-3 when the model was loaded
    partitioned or the arguments hold a stage-3 config, FSDP2 when FSDP2 will run on accelerators,
    DDP for other multi-process runs, local otherwise (``engines.choice.choose_engine``)."""
    if engine != "auto":
        return engine, {}
    ds_config = zero3_config(args)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    zero3 = ds_config is not None or partitioned
    if zero3 and not partitioned and any(is_quantized(module) for module in model.modules()):
        # transformers loads a quantised model whole on every rank, outside zero.Init (QLoRA + ZeRO-3):
        # GoRA estimates it as DDP would, and DeepSpeed partitions it for training afterwards
        zero3, ds_config = False, None
    engine, warning = choose_engine(zero3=zero3, fsdp=fsdp_version(args, accelerator), world=rank_and_world()[1],
                                    cpu=on_cpu(args, accelerator))
    if warning:
        warnings.warn(warning, stacklevel=3)
    return engine, ({"ds_config": ds_config or {"zero_optimization": {"stage": 3}}} if zero3 else {})


def plan_for_run(model: nn.Module, batches: Optional[Iterable], config: GoRAConfig, *, args, accelerator,
                 engine: str, extra: dict, loss_fn=None, plan_from: Optional[str] = None) -> GoRAPlan:
    """The plan estimated under ``engine`` on ``batches`` (this rank's micro-batches), or read from
    ``plan_from``; the model is left as the engine holds it (FSDP2: sharded here first, as the run's
    FSDP2 would shard it, so accelerate takes it as it is)."""
    from gora_dist.pipeline.sharded import estimate_plan

    if engine == "fsdp2":
        shard_fsdp2(model, args, accelerator)
    if plan_from is not None:
        plan = load_plan(plan_from)
        if _names(plan.report.config.target_modules) != _names(config.target_modules):
            raise ValueError(f"plan_from={plan_from}: its plan targets {plan.report.config.target_modules}, "
                             f"this run's config {config.target_modules}")
        return plan
    return estimate_plan(model, batches, config, engine=engine, loss_fn=loss_fn, **extra)


def _names(target_modules):
    return target_modules if isinstance(target_modules, str) else list(target_modules)
