"""Averaged gradients of the target weights, summed in float32 as backward produces them.

Each target weight gets a post-accumulate-grad hook that adds its gradient to a float32 sum and
frees ``.grad`` at once, so backward never holds more than the gradients in flight and no other
parameter gets a gradient at all. Every hook runs in the step that produced the gradient (the
official code flushes one hook late and loses the last layer's final gradient; this does not).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.nn as nn


@contextlib.contextmanager
def gradients_only_for(model: nn.Module, weights: Dict[str, nn.Parameter]) -> Iterator[None]:
    """Within the block only ``weights`` require grad; flags and earlier ``.grad`` come back afterwards, even on error."""
    saved = [(param, param.requires_grad) for param in model.parameters()]
    stashed_grads = [(param, param.grad) for param in weights.values()]  # would leak into the first sum
    try:
        for param, _ in saved:
            param.requires_grad_(False)
        for param in weights.values():
            param.requires_grad_(True)
            param.grad = None
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)
        for param, grad in stashed_grads:
            param.grad = grad


class GradientAccumulator:
    """Sums of each target weight's gradient over steps, in float32, on the weight's device.

    Use as a context manager around the backward passes; call :meth:`end_step` after each one.
    """

    def __init__(self, weights: Dict[str, nn.Parameter]) -> None:
        self.weights = weights
        self.sums = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
        self.nonfinite = {name: torch.zeros((), dtype=torch.bool, device=w.device) for name, w in weights.items()}
        self.steps = 0
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "GradientAccumulator":
        for name, weight in self.weights.items():
            self._handles.append(weight.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        total, flag = self.sums[name], self.nonfinite[name]

        def add_and_free(param: torch.Tensor) -> None:
            grad = param.grad
            flag.logical_or_(~torch.isfinite(grad).all())
            total.add_(grad)
            param.grad = None

        return add_and_free

    def end_step(self) -> None:
        """Count one finished backward; raise if any gradient of this step had a NaN or Inf."""
        self.steps += 1
        flags = torch.stack([flag.cpu() for flag in self.nonfinite.values()])
        if bool(flags.any()):
            bad = [name for name, flag in zip(self.nonfinite, flags.tolist()) if flag]
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValueError(
                f"non-finite gradient (NaN or Inf) at gradient step {self.steps} (1-based) in {shown}: "
                "check the batch and the loss scale"
            )

    def mean(self, name: str) -> torch.Tensor:
        """Ḡ of one layer: (out, in) float32, the sum over :attr:`steps` divided by their number."""
        if self.steps == 0:
            raise ValueError("no gradient step has been run")
        return self.sums[name] / self.steps

    def release(self, name: str) -> None:
        """Drop one layer's sum once it has been used (keeps peak memory at one layer's worth)."""
        self.sums[name] = torch.empty(0)
