"""Adaptive γ (official code, off by default): pick the step size by the loss on a held batch.

B0 is linear in γ, so each layer's B0 is computed once at γ = 1 and scaled for each candidate
γ = base**k. The base model's loss (γ = 0) is the bar: the best candidate that beats it wins;
if none does, B0 = 0.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from gora_dist.model.layers import GoRALinear


@torch.no_grad()
def search_gamma(
    adapters: Dict[str, GoRALinear],
    unit_b: Dict[str, torch.Tensor],
    held_loss: Callable[[], float],
    candidates: Sequence[float],
) -> Tuple[float, List[Tuple[float, float]]]:
    """Set every lora_B to γ·unit_b for the best γ; return (γ, [(γ, loss), ...] tried, γ=0 first).

    held_loss: evaluates the model (with the adapters installed) on the held batch.
    """

    def set_gamma(gamma: float) -> None:
        for name, module in adapters.items():
            module.lora_B.copy_(gamma * unit_b[name])

    set_gamma(0.0)
    trials = [(0.0, held_loss())]
    best_gamma, best_loss = trials[0]
    for gamma in candidates:
        set_gamma(gamma)
        loss = held_loss()
        trials.append((gamma, loss))
        if loss < best_loss:  # a NaN loss never wins
            best_gamma, best_loss = gamma, loss
    set_gamma(best_gamma)
    return best_gamma, trials
