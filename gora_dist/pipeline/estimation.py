"""GoRA's N gradient steps through an engine, and the importance of each layer from their sums.

Failures on any rank are agreed on, never hung on; what crosses the wire is a few floats per layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, List, Optional

import torch

from gora_dist.comm.collectives import Collective
from gora_dist.config import GoRAConfig
from gora_dist.engines.accumulator import ShardedAccumulator
from gora_dist.method.importance import abs_wg_partial_sum, nuclear_norm, relative_change
from gora_dist.method.shards import FlatShard


def _partial_sums(engine, accumulator: ShardedAccumulator, names: List[str]) -> torch.Tensor:
    """(layers, 3) float64: Σ|W⊙Ḡ|, element count and ‖Ḡ‖² over what this rank owns."""
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    for index, name in enumerate(names):
        mean = accumulator.mean(name)
        if mean.numel():
            total, count = abs_wg_partial_sum(engine.local_weight(name), mean)
            sums[index] = torch.tensor([total, count, float(mean.double().square().sum())])
    return sums


def _gather_full(collective: Collective, local: torch.Tensor, shard: FlatShard, owner: int, phase: str):
    """The full (rows, cols) matrix on ``owner`` from every rank's flat shard (None elsewhere).

    Built with all-reduce of a zero-padded full buffer, one layer at a time: simple, works on every
    backend; only for the nuclear-norm metrics, which need the whole matrix by definition.
    """
    full = torch.zeros(shard.rows * shard.cols, dtype=torch.float32, device=collective.device)
    full[shard.start:shard.stop] = local.to(device=full.device, dtype=torch.float32)
    collective.all_reduce(full, phase)
    return full.view(shard.rows, shard.cols) if collective.rank == owner else None


def _importances(engine, accumulator, names, metric: str, collective: Collective):
    """(importance per layer, the summed (layers, 3) partial sums) — the same on every rank."""
    sums = collective.all_reduce(_partial_sums(engine, accumulator, names), "importance partial sums")
    if metric == "mean_abs_wg":
        return {name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(names)}, sums
    values = torch.zeros(len(names), dtype=torch.float64)
    for index, name in enumerate(names):
        owner = index % collective.world_size
        grad = _gather_full(collective, accumulator.mean(name), engine.shard(name), owner, f"gather {name}")
        if metric == "wg_nuclear":
            weight = _gather_full(collective, engine.local_weight(name), engine.shard(name), owner, f"gather {name} weight")
        if grad is not None:
            values[index] = nuclear_norm(grad if metric == "grad_nuclear" else weight * grad)
    collective.all_reduce(values, "nuclear-norm importances")
    return {name: float(values[i]) for i, name in enumerate(names)}, sums


def estimate_gradients(engine, batches: Iterator, config: GoRAConfig, *, loss_fn=None,
                       collective: Optional[Collective] = None):
    """N forward/backward passes through the engine; failures on any rank are agreed on, not hung on.

    Returns (accumulator of owned float32 gradient sums, importance per layer, ‖Ḡ‖² per layer).
    """
    collective = collective or Collective()
    names = list(engine.targets)
    accumulator = ShardedAccumulator({n: engine.shard(n).numel for n in names}, engine.device)
    importance = sums = None
    with torch.enable_grad():
        for step in range(1, config.grad_steps + 1):
            # 1. every rank has a usable batch, before any rank enters the engine's forward collectives
            problem, batch, loss = None, None, None
            try:
                batch = next(batches)
                if loss_fn is None and not isinstance(batch, Mapping):
                    problem = f"gradient step {step}: batch is a {type(batch).__name__}; pass dicts of model inputs, or loss_fn="
            except StopIteration:
                problem = (f"the batches ran out after {step - 1} of grad_steps={config.grad_steps} gradient steps; "
                           "pass more batches or lower grad_steps")
            collective.check(problem, f"gradient step {step} (batch)")
            # 2. every rank has a finite scalar loss (the forward's collectives are behind us)
            try:
                loss = engine.loss(batch, loss_fn, f"gradient step {step}")
            except ValueError as failure:
                problem = str(failure)
            collective.check(problem, f"gradient step {step} (loss)")
            engine.backward(loss, accumulator.add)
            collective.check(accumulator.end_step(), f"gradient step {step} (gradients)")
            if config.adaptive_grad_steps:
                previous = importance
                importance, sums = _importances(engine, accumulator, names, config.importance, collective)
                settled = previous is not None and relative_change(previous, importance) <= config.adaptive_threshold
                if settled and step >= config.adaptive_min_steps:
                    break
    if importance is None:
        importance, sums = _importances(engine, accumulator, names, config.importance, collective)
    return accumulator, importance, sums[:, 2]


