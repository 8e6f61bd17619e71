"""A trainer's own gradient batches and loss, for GoRA's estimation.

The batches are this rank's micro-batches from ``trainer.get_train_dataloader()`` (its collator:
TRL's tokenization, chat template, prompt masking, packing), grouped per optimizer step by the
trainer's own ``get_batch_samples`` (which counts ``num_items_in_batch`` over the step's micro-batches
and the ranks), in the order the first epoch draws them. The loss of each is the trainer's own
``compute_loss``, scaled as ``training_step`` scales it and then by the micro-batches per step, so that
the mean GoRA takes over all backward passes is the mean over optimizer steps of the gradient the
trainer's optimizer would see.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Iterator, Optional

import torch

TRAINER_COUNTERS = ("_metrics", "_total_train_tokens", "current_gradient_accumulation_steps")
"""What a trainer's ``compute_loss`` may record as a side effect (TRL: entropy, token accuracy,
tokens seen): put back after estimation, whose passes are not training."""


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch as the trainer draws it, with what its loss needs to be scaled as in training."""

    inputs: dict
    num_items_in_batch: Optional[object]
    micro_batches_in_step: int


def micro_batches_per_step(trainer) -> int:
    return int(trainer.args.gradient_accumulation_steps)


def batches_available(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset: its length is unknown until it runs out
        return None


def check_enough_batches(loader, optimizer_steps: int, per_step: int) -> None:
    """Raise (same on every rank, before any collective) when the loader is too short."""
    available = batches_available(loader)
    needed = optimizer_steps * per_step
    if available is not None and available < needed:
        raise ValueError(f"the trainer's dataloader has {available} micro-batches on this rank; GoRA needs {needed} "
                         f"(grad_steps={optimizer_steps} optimizer steps x {per_step} micro-batches each): "
                         "lower grad_steps or give more training data")


def trainer_micro_batches(trainer, loader, optimizer_steps: int) -> Iterator[MicroBatch]:
    """This rank's micro-batches of the first ``optimizer_steps`` optimizer steps of epoch 0."""
    per_step = micro_batches_per_step(trainer)
    for wrapped in (loader, getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)):
        if hasattr(wrapped, "set_epoch"):  # as the training loop does before its first epoch
            wrapped.set_epoch(0)
    iterator = iter(loader)
    try:
        for _ in range(optimizer_steps):
            samples, num_items = trainer.get_batch_samples(iterator, per_step, trainer.args.device)
            for inputs in samples:
                yield MicroBatch(inputs, num_items, len(samples))
    finally:
        if hasattr(loader, "end"):  # accelerate's loader registers itself while iterated; left early, say so
            loader.end()


def loss_scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """``training_step``'s rule: the loss is already normalised over the whole step when the model or
    ``compute_loss_func`` divided it by ``num_items_in_batch`` (or the trainer says so)."""
    told = getattr(trainer, "loss_is_scaled_for_ga", None)
    if told is not None:
        return bool(told)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


def trainer_loss(trainer):
    """``loss_fn(model, micro_batch)`` for ``estimate_plan``: the trainer's ``compute_loss`` on the
    prepared inputs, under the autocast accelerate wraps the trained model's forward in (TRL's default
    ``bf16=True``), times the micro-batches per step when the trainer would not divide it by them."""
    def loss(model, micro: MicroBatch) -> torch.Tensor:
        inputs = trainer._prepare_inputs(micro.inputs)
        trainer.current_gradient_accumulation_steps = micro.micro_batches_in_step
        with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
            value = trainer.compute_loss(model, inputs, num_items_in_batch=micro.num_items_in_batch)
        if loss_scaled_for_accumulation(trainer, micro.num_items_in_batch):
            return value * micro.micro_batches_in_step
        return value

    return loss


@contextlib.contextmanager
def trainer_state_kept(trainer) -> Iterator[None]:
    """The trainer's logged counters and the random state as they were before estimation."""
    saved = {name: copy.deepcopy(getattr(trainer, name)) for name in TRAINER_COUNTERS if hasattr(trainer, name)}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(trainer, name, value)
