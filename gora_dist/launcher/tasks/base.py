"""What the launcher's run needs of a task, and the plumbing every task shares: this rank's training
micro-batches, its evaluation chunks, sums over ranks.

A task holds its training and held-out examples and knows two things: how to turn examples into a
batch of model inputs (``batch``), and how to score the model on the held-out examples
(``evaluate``, a collective: every rank calls it, every rank gets the same metrics). Adding a task
is a new module with one class; the run does not change.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist

from gora_dist.pipeline.batches import rank_micro_batches


class Task(Protocol):
    train: Sequence
    evaluation: Sequence
    metric_names: Tuple[str, ...]
    """The keys ``evaluate`` returns; metrics.json gets ``<name>_before`` and ``<name>_after``."""

    def summary(self) -> List[str]:
        """Lines the run prints about the data (counts, cuts, skips)."""

    def batch(self, examples: Sequence, *, global_batch: Sequence = (), share: int = 1) -> dict:
        """Model inputs with labels for ``model(**batch).loss``. global_batch: every example of the
        global batch these belong to; share: the ranks × micro-batches it is split into (a task whose
        examples weigh unequally in the loss scales by them, so every world size gets the same gradient)."""

    def evaluate(self, evaluator, setup, batch_size: int) -> Tuple[dict, List[dict]]:
        """(metrics, samples): samples are a few readable predictions, on rank 0 only ([] elsewhere)."""


def rank_chunks(examples: Sequence, setup, size: int,
                length: Optional[Callable[[object], int]] = None) -> Iterator[Tuple[list, int, List[int]]]:
    """This rank's examples (``examples[rank::world]``) in chunks of ``size``: (chunk, real, indices).

    Every rank yields the same number of chunks, each of ``size``: a short one is padded with a copy of
    its own last example (``examples[0]`` when empty; ``real`` of them count), because under FSDP2 and
    ZeRO-3 every forward needs every rank. ``length``: this rank's examples go by length, so each chunk
    pads to a width near its own (unsorted, padding was almost half of ASDiv's scoring compute).
    """
    mine = list(range(setup.rank, len(examples), setup.world))
    if length is not None:
        mine.sort(key=lambda i: length(examples[i]))
    for start in range(0, math.ceil(math.ceil(len(examples) / setup.world) / size) * size, size):
        indices = mine[start:start + size]
        chunk = [examples[i] for i in indices]
        filler = chunk[-1] if chunk else examples[0]
        yield chunk + [filler] * (size - len(chunk)), len(chunk), indices


def all_sum(values: Sequence[float], setup) -> List[float]:
    """Element-wise sums over ranks (float64; on the GPU under NCCL)."""
    tensor = torch.tensor(list(values), dtype=torch.float64,
                          device=setup.device if setup.device.type == "cuda" else "cpu")
    if setup.world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_samples(samples: List[dict], setup) -> List[dict]:
    """Every rank's samples on rank 0, ordered by their ``index``; [] on the other ranks."""
    if setup.world > 1:
        gathered = [None] * setup.world
        dist.all_gather_object(gathered, samples)
        samples = [sample for part in gathered for sample in part]
    return sorted(samples, key=lambda sample: sample["index"]) if setup.rank == 0 else []


def rank_batches(task: Task, global_indices: Sequence[int], setup) -> List[dict]:
    """This rank's micro-batches of one global batch of ``task.train`` (``pipeline.batches``' split),
    each knowing the global batch it belongs to."""
    whole = [task.train[i] for i in global_indices]
    share = len(global_indices) // setup.micro  # ranks x micro-batches per rank
    return [task.batch([task.train[i] for i in indices], global_batch=whole, share=share)
            for indices in rank_micro_batches(global_indices, setup.rank, setup.world, setup.micro)]


def scores_text(scores: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
