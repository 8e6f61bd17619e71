"""SFT's loss without full-vocabulary logits: the model computes logits only at the positions whose
next token is a target (``logits_to_keep`` with those positions), and the cross-entropy runs in
float32 one chunk of positions at a time, its gradient computed in the same pass and written over
the logits (no float32 copy or softmax of them all is kept). The value is the model's own loss (the sum over target tokens / ``num_items_in_batch``); what is gone is
the (batch × length × vocabulary) logits at prompt and padding positions and their float32 copies."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

CHUNK_POSITIONS = 1024
"""Positions per cross-entropy chunk: a chunk's float32 logits are 1024 × vocabulary × 4 bytes
(0.5 GB at a 128k vocabulary), alive only while that chunk is computed."""


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t (shared by every row) whose logits predict a target, labels[:, t + 1] != -100."""
    return torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()


SAFE_TO_OVERWRITE = ("MmBackward0", "AddmmBackward0", "BmmBackward0", "UnsafeViewBackward0", "ViewBackward0",
                     "ReshapeAliasBackward0", "ToCopyBackward0")
"""Operations that produce the logits without keeping them for their own backward (a linear head,
a reshape, a dtype cast): the logits may then be overwritten by their gradient."""


class _CrossEntropySum(torch.autograd.Function):
    """Sum of float32 cross-entropy, chunk by chunk, with the gradient (softmax - one-hot, zero where
    the target is -100) computed in the same pass and written over the logits, which nothing needs
    after this: a step holds one logits-sized tensor, never their float32 copy or softmax whole.
    Where the logits came from an operation that keeps them (a soft-capping tanh, say) the gradient
    goes to a buffer of its own instead."""

    @staticmethod
    def forward(ctx, logits, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        gradient = None
        if ctx.needs_input_grad[0]:
            overwrite = type(logits.grad_fn).__name__ in SAFE_TO_OVERWRITE if logits.grad_fn is not None else False
            gradient = logits if overwrite else torch.empty_like(logits)
        for start in range(0, logits.shape[1], chunk):
            piece = logits[:, start:start + chunk].float()
            if gradient is not None and gradient is not logits and logits.dtype == torch.float32:
                piece = piece.clone()  # float32 logits that something keeps (.float() was no copy): work on one
            wanted = targets[:, start:start + chunk]
            valid = (wanted != -100).unsqueeze(-1)
            index = wanted.clamp(min=0).unsqueeze(-1)
            norm = torch.logsumexp(piece, dim=-1, keepdim=True)
            total += ((norm - piece.gather(-1, index)) * valid).sum()
            if gradient is not None:
                probabilities = piece.sub_(norm).exp_()
                probabilities.scatter_add_(-1, index, -valid.to(probabilities.dtype)).mul_(valid)
                gradient[:, start:start + chunk].copy_(probabilities)
        ctx.gradient = gradient
        return total

    @staticmethod
    def backward(ctx, grad_output):
        gradient, ctx.gradient = ctx.gradient, None
        return gradient.mul_(grad_output.to(gradient.dtype)), None, None


def chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """Sum of float32 cross-entropy over (batch, positions, vocabulary) logits and their targets
    (-100: none), ``chunk`` positions at a time; see :class:`_CrossEntropySum` for its memory."""
    return _CrossEntropySum.apply(logits, targets, chunk)


def keeps_logits_at_positions(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (every transformers causal LM of 4.50+)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "get_base_model", lambda: inner)()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def response_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The SFT loss of one micro-batch through ``model`` (plain, DDP, FSDP2 or a DeepSpeed engine),
    equal to ``model(**batch).loss``."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    items = inputs.pop("num_items_in_batch", None)
    positions = target_positions(labels)
    logits = model(**inputs, logits_to_keep=positions).logits
    targets = labels[:, 1:][:, positions]
    total = chunked_cross_entropy_sum(logits, targets, CHUNK_POSITIONS)
    count = items if items is not None else (targets != -100).sum()
    return total / count
