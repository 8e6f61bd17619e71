"""The scalar loss of one batch: ``loss_fn(model, batch)`` or ``model(**batch).loss``, checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn as nn

LossFn = Callable[[nn.Module, object], torch.Tensor]


def batch_loss(model: nn.Module, batch, loss_fn: Optional[LossFn], where: str, require_finite: bool = True):
    """The scalar loss of one batch: ``loss_fn(model, batch)`` or ``model(**batch).loss``."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise ValueError(f"{where}: batch is a {type(batch).__name__}; pass dicts of model inputs, or loss_fn=")
        output = model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"{where}: the model returned no loss; include labels in the batch or pass loss_fn=")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{where}: the loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    if require_finite and not torch.isfinite(loss.detach()).all():
        raise ValueError(f"{where}: the loss is {loss.item()} (not finite)")
    return loss
