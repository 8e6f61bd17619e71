"""Adapters trained on an offset base (LoRA-GA, PiSSA: W − s·B0·A0) written for the original W and
read back: the rank-2r form [A; A0], [B, −B0] that PEFT's ``path_initial_model_for_weight_conversion``
writes, and its split into the trained and the initial halves."""

from __future__ import annotations

import torch

from gora_dist.report import GoRAReport


def converted_for_original_base(weights, initial, alpha: float, use_rslora: bool):
    """For an adapter trained on an offset base W − s·B0·A0 (LoRA-GA, PiSSA): the rank-2r adapter
    [A; A0], [B, −B0] whose s·B′A′ = s·(B·A − B0·A0) applies to the original W, and the α that keeps
    each layer's scale s at rank 2r (α·√2 with rsLoRA, 2α without), as PEFT's
    ``path_initial_model_for_weight_conversion`` writes it."""
    missing = sorted(set(weights) - set(initial))
    if missing:
        raise ValueError(f"the initial A0/B0 of {missing[:3]} are unknown: cannot convert the adapter for the original base")
    converted = {name: (torch.cat([lora_a.detach().float(), initial[name][0].float().to(lora_a.device)], dim=0),
                        torch.cat([lora_b.detach().float(), -initial[name][1].float().to(lora_b.device)], dim=1))
                 for name, (lora_a, lora_b) in weights.items()}
    return converted, alpha * (2 ** 0.5 if use_rslora else 2.0)


def plan_from_converted(report: GoRAReport, weights, saved_state):
    """A GoRAPlan from a converted adapter's {module: ([A; A0], [B, −B0])} of rank 2r: the trained
    halves as its A/B, the initial ones (what the base is offset by) as ``initial_a``/``initial_b``."""
    from gora_dist.report import GoRAPlan

    ranks = report.rank_map
    return GoRAPlan(report, {n: a[:ranks[n]].float() for n, (a, _) in weights.items()},
                    {n: b[:, :ranks[n]].float() for n, (_, b) in weights.items()}, dict(saved_state),
                    initial_a={n: a[ranks[n]:].float() for n, (a, _) in weights.items()},
                    initial_b={n: -b[:, ranks[n]:].float() for n, (_, b) in weights.items()})
