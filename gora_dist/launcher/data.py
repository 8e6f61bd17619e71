"""The data order of every task: a fixed split, and global batches that depend only on the seed
and the global batch size, of which each rank takes its slice (so every world size sees the same
batches)."""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch

SPLIT_SEED = 1234  # the train/eval split never depends on the run's seed


def split_examples(examples: Sequence, train_count: int, eval_count: int) -> Tuple[list, list]:
    """A fixed shuffle (SPLIT_SEED), the eval set first, then up to train_count training examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    if len(order) < eval_count + 1:
        raise ValueError(f"only {len(order)} examples: too few for eval_examples={eval_count} plus training")
    evaluation = [examples[i] for i in order[:eval_count]]
    training = [examples[i] for i in order[eval_count:eval_count + train_count]]
    return training, evaluation


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
