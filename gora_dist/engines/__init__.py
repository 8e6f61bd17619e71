"""Estimation engines: how each training engine exposes, after its own gradient reduction, the part
of every target weight's gradient that this rank owns.

Each engine wraps the user's (unwrapped) model for the N gradient steps and offers the same small
interface to the GoRA pipeline (``gora_dist.pipeline.plan.build_plan``):

- ``targets``: {name: nn.Linear} in module order, names as in the unwrapped model;
- ``shard(name)`` -> ``FlatShard`` and ``local_weight(name)`` -> the owned elements of W, flat;
- ``loss(batch, loss_fn)`` runs the forward through the engine;
- ``backward(loss, add)`` runs the engine's backward, then hands each owned gradient shard to
  ``add(name, flat_grad)`` and frees it;
- ``close()`` undoes what the engine did to requires_grad flags and tears its wrapper down.

Only ``deepspeed_zero`` imports deepspeed, and only when used.
"""

from gora_dist.engines.base import EstimationEngine, LocalEngine
from gora_dist.engines.ddp import DDPEngine
from gora_dist.engines.fsdp2 import FSDP2Engine


def ZeroEngine(*args, **kwargs):
    """DeepSpeed ZeRO-3 estimation engine (imports deepspeed on first use)."""
    from gora_dist.engines.deepspeed_zero import ZeroEngine as _ZeroEngine

    return _ZeroEngine(*args, **kwargs)


__all__ = ["EstimationEngine", "LocalEngine", "DDPEngine", "FSDP2Engine", "ZeroEngine"]
