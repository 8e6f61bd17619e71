"""The fixed train/eval split of every task (its global batches: ``gora_dist.pipeline.batches``)."""

from __future__ import annotations

from typing import Sequence, Tuple

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
