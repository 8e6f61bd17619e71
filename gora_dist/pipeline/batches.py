"""Global batches that depend only on the seed and the global batch size, and each rank's share of
one: every world size (and every accumulation) sees the same batches, so the estimate is the same.
The launcher and the Trainer integration both draw their batches here."""

from __future__ import annotations

from typing import Iterator, List

import torch


def global_batch_indices(count: int, global_batch: int, seed: int, stream: int) -> Iterator[List[int]]:
    """Endless global batches of example indices: one permutation per epoch, seeded by (seed, stream, epoch)."""
    epoch, pending = 0, []
    while True:
        while len(pending) < global_batch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7919 + epoch)
            pending.extend(torch.randperm(count, generator=generator).tolist())
            epoch += 1
        yield pending[:global_batch]
        pending = pending[global_batch:]


def rank_micro_batches(global_indices: List[int], rank: int, world: int, micro: int) -> List[List[int]]:
    """This rank's micro-batches of one global batch: micro-step a takes [(a·world + rank)·micro, … + micro)."""
    accumulation = len(global_indices) // (world * micro)
    return [global_indices[(step * world + rank) * micro:(step * world + rank + 1) * micro] for step in range(accumulation)]
