"""apply_gora: GoRA on one process — the plan pipeline with the local engine, then the adapters.

The model is left exactly as it was if anything fails (requires_grad flags, gradients, modules);
on success every target ``nn.Linear`` is wrapped in a ``GoRALinear`` and only adapters train.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch.nn as nn

from .apply_utils import LossFn, batch_loss, to_device
from .config import GoRAConfig, gamma_candidates
from .engines.base import LocalEngine
from .gamma_search import search_gamma
from .layers import set_submodule
from .plan import apply_plan, build_plan
from .report import GoRAReport


def apply_gora(
    model: nn.Module,
    batches: Iterable,
    config: Optional[GoRAConfig] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    held_batch=None,
) -> GoRAReport:
    """Estimate gradients on ``batches``, allocate ranks, initialise and install GoRA adapters.

    batches: iterable of dicts for ``model(**batch)`` (whose output has ``.loss``), or anything
    ``loss_fn(model, batch) -> scalar`` understands. held_batch: for adaptive γ; by default the
    batch after the ones used for gradients. Returns the report; the model is modified in place.
    For sharded training use ``gora_dist.distributed.estimate_plan`` instead.
    """
    config = config or GoRAConfig()
    batch_iter = iter(batches)
    engine = LocalEngine(model, config.target_modules)
    try:
        plan = build_plan(engine, batch_iter, config, loss_fn=loss_fn)
    finally:
        engine.close()

    saved_flags = [(param, param.requires_grad) for param in model.parameters()]
    originals = {name: model.get_submodule(name) for name in plan.lora_a}
    try:
        adapters = apply_plan(model, plan)
        if config.adaptive_gamma:
            plan.report.gamma, plan.report.gamma_search = _adaptive_gamma(
                model, adapters, plan.lora_b, batch_iter, held_batch, loss_fn, engine.device, config
            )
    except BaseException:
        for name, base in originals.items():
            set_submodule(model, name, base)
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        raise
    return plan.report


def _adaptive_gamma(model, adapters, unit_b, batch_iter, held_batch, loss_fn, device, config):
    """Run the γ search on the held batch (default: the next batch after the gradient steps)."""
    if held_batch is None:
        held_batch = next(batch_iter, None)
        if held_batch is None:
            raise ValueError("adaptive_gamma needs a held batch: pass held_batch= or one batch more than grad_steps")
    held_batch = to_device(held_batch, device) if device else held_batch
    was_training = model.training
    model.eval()  # dropout off: candidates are compared on the same function

    def held_loss() -> float:
        return float(batch_loss(model, held_batch, loss_fn, "adaptive gamma (held batch)", require_finite=False))

    unit_b = {name: b.to(adapters[name].lora_B.device) for name, b in unit_b.items()}
    try:
        return search_gamma(adapters, unit_b, held_loss, gamma_candidates(config))
    finally:
        model.train(was_training)

