"""A plan into a model: ``apply_plan`` (any engine's plan, the model unwrapped or still sharded),
``copy_plan_into_adapters`` (adapters materialised from meta), and ``apply_gora``, GoRA on one process
(the pipeline with the local engine, then the adapters). ``apply_gora`` leaves the model exactly as it
was if anything fails (requires_grad flags, gradients, modules); on success every target
``nn.Linear`` is a ``GoRALinear`` and only adapters train.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch.nn as nn

from gora_dist.comm.gather import write_full
from gora_dist.comm.replicated import average_beside_shards
from gora_dist.config import OFFSET_INITIALIZERS, GoRAConfig, gamma_candidates
from gora_dist.engines.base import LocalEngine
from gora_dist.model.base_offset import check_offset_bases, offset_base
from gora_dist.model.devices import to_device
from gora_dist.model.layers import GoRALinear, install_adapters, set_submodule
from gora_dist.model.loss import LossFn, batch_loss
from gora_dist.pipeline.gamma_search import search_gamma
from gora_dist.pipeline.plan import build_plan
from gora_dist.report import GoRAPlan, GoRAReport


def apply_plan(model: nn.Module, plan: GoRAPlan) -> Dict[str, GoRALinear]:
    """Wrap every planned layer of ``model`` in a GoRALinear holding the plan's A0 and B0; freeze
    everything else. Checks every layer before changing anything.

    ``model`` is unwrapped, or still sharded by the estimation: ZeRO-3 partitioned (then
    ``deepspeed.initialize`` it), or FSDP2 ``fully_shard``-ed (train it as it is: the adapters are
    replicated on every rank and their gradients averaged at the end of each backward, see
    ``gora_dist.comm.replicated``).

    On a meta-device model the adapters are created on meta too; fill them after materialising
    with :func:`copy_plan_into_adapters`.
    """
    config = plan.report.config
    weights = {name: (plan.lora_a[name], plan.lora_b[name]) for name in plan.lora_a}
    offset = config.initializer in OFFSET_INITIALIZERS
    if offset:
        check_offset_bases(model, weights, config.initializer)
    adapters = install_adapters(model, weights, alpha=config.alpha, use_rslora=config.use_rslora, dropout=config.dropout,
                                modules_to_save=config.modules_to_save, saved_state=plan.saved_state)
    # an FSDP2 model: the new adapters are replicated, their gradients averaged per backward
    average_beside_shards(model, [p for m in adapters.values() for p in (m.lora_A, m.lora_B)])
    if offset:  # LoRA-GA / PiSSA: the base becomes W − s·B0·A0, each rank its own elements
        for name, adapter in adapters.items():
            initial_a, initial_b = plan.initial(name)
            offset_base(adapter.base.weight, initial_a, initial_b, adapter.scaling, name)
            adapter.initial_factors = (initial_a, initial_b)  # for save_adapter's conversion
    return adapters


def copy_plan_into_adapters(model: nn.Module, plan: GoRAPlan) -> None:
    """Write A0/B0 into adapters that were created on meta and then materialised, possibly sharded
    (FSDP2 DTensors: each rank writes its own shard)."""
    for name, rank in plan.rank_map.items():
        if rank == 0:
            continue
        adapter = model.get_submodule(name)
        write_full(adapter.lora_A, plan.lora_a[name])
        write_full(adapter.lora_B, plan.lora_b[name])


def apply_gora(
    model: nn.Module,
    batches: Iterable,
    config: Optional[GoRAConfig] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    held_batch=None,
    on_phase: Optional[Callable[[str], None]] = None,
) -> GoRAReport:
    """Estimate gradients on ``batches``, allocate ranks, initialise and install GoRA adapters.

    batches: iterable of dicts for ``model(**batch)`` (whose output has ``.loss``), or anything
    ``loss_fn(model, batch) -> scalar`` understands. held_batch: for adaptive γ; by default the
    batch after the ones used for gradients. on_phase: see ``build_plan``. Returns the report; the
    model is modified in place.
    For sharded training use ``estimate_plan`` instead.
    """
    config = config or GoRAConfig()
    batch_iter = iter(batches)
    engine = LocalEngine(model, config.target_modules)
    try:
        plan = build_plan(engine, batch_iter, config, loss_fn=loss_fn, on_phase=on_phase)
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

