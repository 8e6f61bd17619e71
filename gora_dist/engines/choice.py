"""Which estimation engine a run uses (one rule for the launcher, ``estimate_plan`` and the Trainer
integration), and the engine itself built around the user's unwrapped model."""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn

from gora_dist.config import GoRAConfig
from gora_dist.engines.base import LocalEngine
from gora_dist.engines.ddp import DDPEngine
from gora_dist.engines.fsdp2 import FSDP2Engine

CPU_FSDP_WARNING = ("FSDP was asked for on the CPU, where accelerate trains with DDP instead: GoRA estimates with "
                    "DDP as well (every rank holds the whole model and its target gradients)")
FSDP1_WARNING = ("FSDP1 run: GoRA estimates with DDP (every rank holds the whole model and its target gradients "
                 "during the gradient steps); use FSDP2 (fsdp_config={'version': 2}) to shard it")


def choose_engine(*, zero3: bool, fsdp: Optional[int], world: int, cpu: bool) -> Tuple[str, Optional[str]]:
    """The estimation engine for a run, and a warning when it cannot shard as asked: ZeRO-3 when the
    run uses it, FSDP2 when FSDP2 will run (several processes on accelerator devices), DDP for other
    multi-process runs, ``local`` for one process."""
    if zero3:
        return "zero3", None
    if fsdp is not None and world > 1 and cpu:
        return "ddp", CPU_FSDP_WARNING
    if fsdp == 2 and world > 1:
        return "fsdp2", None
    if fsdp == 1 and world > 1:
        return "ddp", FSDP1_WARNING
    return ("ddp" if world > 1 else "local"), None


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
        from gora_dist.engines.deepspeed_zero import ZeroEngine  # deepspeed is imported only when used

        return ZeroEngine(model, config.target_modules, ds_config if ds_config is not None else {})
    raise ValueError(f"engine={kind!r} is not one of {list(ENGINES)}")


