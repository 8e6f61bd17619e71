"""The float32 sum of each target weight's gradient over the steps, for the part this rank owns.

Engines hand over each owned gradient shard (flat) once per step; it is added to a float32 sum the
size of that shard: 1/world of the target weights under ZeRO-3 or FSDP2, all of them on one
process or under DDP. Every step's gradients are checked for NaN/Inf with one flag per layer.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional

import torch
import torch.nn as nn


@contextlib.contextmanager
def gradients_only_for(model: nn.Module, weight_names: Iterable[str]) -> Iterator[None]:
    """Within the block only the parameters called ``weight_names`` require grad; flags and earlier
    ``.grad`` come back afterwards, even on error.

    By name, never holding a parameter: an engine (FSDP2) replaces the parameters inside the block,
    and a reference kept here would keep every unsharded target weight alive through estimation."""
    wanted = set(weight_names)
    params = dict(model.named_parameters())
    missing = sorted(wanted - set(params))
    if missing:
        raise ValueError(f"no parameter called {missing[0]} in the model")
    saved = {name: param.requires_grad for name, param in params.items()}
    stashed_grads = {name: params[name].grad for name in wanted if params[name].grad is not None}
    try:
        for param in params.values():
            param.requires_grad_(False)
        for name in wanted:
            params[name].requires_grad_(True)
            params[name].grad = None  # an earlier .grad would leak into the first sum
        del params
        yield
    finally:
        for name, param in model.named_parameters():
            if name in saved:
                param.requires_grad_(saved[name])
            if name in stashed_grads:
                param.grad = stashed_grads[name]


def target_weight_names(targets: Dict[str, nn.Module]) -> list:
    """The parameter names of the target modules' weights."""
    return [f"{name}.weight" for name in targets]


class ShardedAccumulator:
    """Float32 sums of owned gradient shards. sizes: {name: elements this rank owns}."""

    def __init__(self, sizes: Dict[str, int], device: Optional[torch.device] = None) -> None:
        self.sums = {name: torch.zeros(size, dtype=torch.float32, device=device) for name, size in sizes.items()}
        self.nonfinite = {name: torch.zeros((), dtype=torch.bool, device=device) for name in sizes}
        self.steps = 0

    def add(self, name: str, flat_grad: torch.Tensor) -> None:
        """Add one owned gradient shard (any dtype, flat, same length as the sum)."""
        self.nonfinite[name].logical_or_(~torch.isfinite(flat_grad).all())
        self.sums[name].add_(flat_grad.to(self.sums[name].device))

    def end_step(self) -> Optional[str]:
        """Count one finished backward; describe this step's NaN/Inf gradients, or return None."""
        self.steps += 1
        flags = torch.stack([flag.cpu() for flag in self.nonfinite.values()]) if self.nonfinite else torch.zeros(0)
        if not bool(flags.any()):
            return None
        bad = [name for name, flag in zip(self.nonfinite, flags.tolist()) if flag]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"non-finite gradient (NaN or Inf) at gradient step {self.steps} (1-based) in {shown}: check the batch and the loss scale"

    def mean(self, name: str) -> torch.Tensor:
        """The owned part of Ḡ, flat float32: the sum over :attr:`steps` divided by their number."""
        if self.steps == 0:
            raise ValueError("no gradient step has been run")
        return self.sums[name] / self.steps

    def held_elements(self) -> int:
        return sum(total.numel() for total in self.sums.values())

    def release(self, name: str) -> None:
        """Drop one layer's sum once it has been used (keeps the peak at what is still needed)."""
        self.sums[name] = torch.empty(0)
