"""Sharded GoRA for existing training code: estimate the plan under your engine, apply it before
wrapping the model for training.

    plan = estimate_plan(model, my_rank_batches, config, engine="zero3", ds_config=ds_config)
    apply_plan(model, plan)                       # the same, still partitioned (or FSDP2-sharded) model
    engine, *_ = deepspeed.initialize(model=model, optimizer=AdamW(adapter params), config=ds_config)

See docs/distributed.md for the flow per engine.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch.distributed as dist
import torch.nn as nn

from .collectives import Collective, GoRADistributedError
from .config import GoRAConfig
from .engines import DDPEngine, FSDP2Engine, LocalEngine, ZeroEngine
from .plan import GoRAPlan, apply_plan, build_plan, copy_plan_into_adapters

ENGINES = ("local", "ddp", "fsdp2", "zero3")


def make_engine(kind: str, model: nn.Module, config: GoRAConfig, *, ds_config: Optional[dict] = None,
                mesh=None, shard_modules=None, ddp_kwargs: Optional[dict] = None, fsdp_kwargs: Optional[dict] = None):
    """The estimation engine called ``kind`` around ``model`` (unwrapped)."""
    if kind == "local":
        return LocalEngine(model, config.target_modules)
    if kind == "ddp":
        return DDPEngine(model, config.target_modules, **(ddp_kwargs or {}))
    if kind == "fsdp2":
        return FSDP2Engine(model, config.target_modules, mesh=mesh, shard_modules=shard_modules, **(fsdp_kwargs or {}))
    if kind == "zero3":
        return ZeroEngine(model, config.target_modules, ds_config if ds_config is not None else {})
    raise ValueError(f"engine={kind!r} is not one of {list(ENGINES)}")


def estimate_plan(
    model: nn.Module,
    batches: Iterable,
    config: Optional[GoRAConfig] = None,
    *,
    engine: str = "auto",
    loss_fn=None,
    timeout_s: float = 300.0,
    group: Optional[dist.ProcessGroup] = None,
    **engine_kwargs,
) -> GoRAPlan:
    """GoRA's estimation and initialisation with the model sharded by ``engine``; every rank returns
    the same plan. batches: this rank's share of each global batch (equal micro-batch sizes).

    engine: ``zero3`` (``ds_config=``), ``fsdp2`` (``mesh=``, ``shard_modules=``, ``fsdp_kwargs=``),
    ``ddp`` (``ddp_kwargs=``), ``local``, or ``auto`` (ddp with a process group of several ranks,
    else local). timeout_s bounds every collective GoRA itself issues.
    """
    config = config or GoRAConfig()
    if engine == "auto":
        engine = "ddp" if dist.is_initialized() and dist.get_world_size(group) > 1 else "local"
    estimator = make_engine(engine, model, config, **engine_kwargs)
    try:
        return build_plan(estimator, batches, config, loss_fn=loss_fn, collective=Collective(group, timeout_s))
    finally:
        estimator.close()


__all__ = ["estimate_plan", "apply_plan", "copy_plan_into_adapters", "make_engine", "GoRAPlan", "GoRADistributedError"]
