"""Sharded GoRA for existing training code: estimate the plan under your engine, apply it before
wrapping the model for training.

    plan = estimate_plan(model, my_rank_batches, config, engine="zero3", ds_config=ds_config)
    apply_plan(model, plan)                       # the same, still partitioned (or FSDP2-sharded) model
    engine, *_ = deepspeed.initialize(model=model, optimizer=AdamW(adapter params), config=ds_config)

See docs/distributed.md for the flow per engine.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch.distributed as dist
import torch.nn as nn

from gora_dist.comm.collectives import Collective
from gora_dist.config import GoRAConfig
from gora_dist.engines.choice import choose_engine, make_engine
from gora_dist.pipeline.plan import build_plan
from gora_dist.report import GoRAPlan


def estimate_plan(
    model: nn.Module,
    batches: Iterable,
    config: Optional[GoRAConfig] = None,
    *,
    engine: str = "auto",
    loss_fn=None,
    timeout_s: float = 300.0,
    group: Optional[dist.ProcessGroup] = None,
    on_phase: Optional[Callable[[str], None]] = None,
    **engine_kwargs,
) -> GoRAPlan:
    """GoRA's estimation and initialisation with the model sharded by ``engine``; every rank returns
    the same plan. batches: this rank's share of each global batch (equal micro-batch sizes).

    engine: ``zero3`` (``ds_config=``), ``fsdp2`` (``mesh=``, ``shard_modules=``, ``fsdp_kwargs=``),
    ``ddp`` (``ddp_kwargs=``), ``local``, or ``auto`` (ddp with a process group of several ranks,
    else local). timeout_s bounds every collective GoRA itself issues. on_phase: see ``build_plan``.
    """
    config = config or GoRAConfig()
    if engine == "auto":
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        engine, _ = choose_engine(zero3=False, fsdp=None, world=world, cpu=False)
    estimator = make_engine(engine, model, config, **engine_kwargs)
    try:
        return build_plan(estimator, batches, config, loss_fn=loss_fn, collective=Collective(group, timeout_s),
                          on_phase=on_phase)
    finally:
        estimator.close()


__all__ = ["estimate_plan"]
