"""The one clipping rule of every engine, and the guard against non-finite steps.

The rule is torch's ``clip_grad_norm_`` and DeepSpeed's: the 2-norm of all trainable gradients of
the run (every rank's shard counted once), and when it exceeds ``max_norm`` every gradient scaled by
``max_norm / (norm + 1e-6)``. The launcher computes the norm itself under every engine, before the
update, so the same command clips the same way under local, DDP, FSDP2 and ZeRO (where DeepSpeed
applies it from ``gradient_clipping``), and a step whose loss or norm is not finite can be stopped
or skipped before it touches the adapters.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

CLIP_EPSILON = 1e-6
"""torch's and DeepSpeed's: norm + 1e-6 in the clip coefficient's denominator."""


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm is not finite (every rank raises it at the same step)."""


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor every gradient is multiplied by: ``min(1, max_norm / (norm + 1e-6))``; 1 when
    clipping is off (max_norm 0)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPSILON))


def is_finite_step(loss: float, norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(norm)


def nonfinite_message(step: int, loss: float, norm: float, latest: Optional[str]) -> str:
    where = f"the last checkpoint, {latest}, holds finite values" if latest else "no checkpoint was written yet"
    return (f"step {step}: loss {loss}, gradient norm {norm} (not finite): stopping before this update, nothing of "
            f"it saved; {where}. Lower --lr, keep --max-grad-norm on, or pass --skip-nonfinite to skip such steps")


def squared_grad_sums(parameters: List[torch.nn.Parameter]) -> List[torch.Tensor]:
    """Per parameter, the sum of squares of its gradient as this rank must count it: a plain tensor
    (replicated: local, DDP, adapters beside FSDP2 shards) whole; an FSDP2 DTensor reduced over its
    mesh (``full_tensor`` of the norm, a scalar collective), so each shard counts once."""
    sums = []
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        norm = torch.linalg.vector_norm(grad, 2, dtype=torch.float32)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        sums.append(norm.float() ** 2)
    return sums


def torch_grad_norm(parameters: List[torch.nn.Parameter]) -> float:
    """The run's gradient norm under local, DDP and FSDP2 (a collective under FSDP2 when a trainable
    parameter is sharded; every rank gets the same value)."""
    sums = squared_grad_sums(parameters)
    return math.sqrt(float(torch.stack(sums).sum())) if sums else 0.0


@torch.no_grad()
def scale_gradients(parameters: List[torch.nn.Parameter], factor: float) -> None:
    if factor == 1.0:
        return
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_(factor)
