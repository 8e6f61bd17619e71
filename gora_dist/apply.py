"""apply_gora: gradient estimation → importance → rank map → A0/B0 → adapters in the model.

The model is left exactly as it was if anything fails (requires_grad flags, gradients, modules);
on success every target ``nn.Linear`` is wrapped in a ``GoRALinear`` and only adapters train.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .allocation import allocate_ranks, lora_param_count, lora_reference_count, rank_budget
from .config import GoRAConfig, gamma_candidates
from .gamma_search import search_gamma
from .gradients import GradientAccumulator, gradients_only_for
from .importance import layer_importance, normalize_importance, relative_change
from .initialization import gora_init_b, kaiming_uniform_a
from .layers import GoRALinear, mark_only_adapters_trainable, set_submodule
from .report import GoRAReport, LayerReport

LossFn = Callable[[nn.Module, object], torch.Tensor]


def module_matches(name: str, target_modules) -> bool:
    """PEFT's rule: a list matches equal names or ``.entry`` suffixes; a string is a full-name regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_target_modules(model: nn.Module, target_modules) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to adapt, by name, in module order; errors name what is wrong."""
    found = {}
    for name, module in model.named_modules():
        if not name or not module_matches(name, target_modules):
            continue
        if isinstance(module, GoRALinear):
            raise ValueError(f"{name} already carries a GoRA adapter: apply_gora runs once per model")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name} matches target_modules but is a {type(module).__name__}; GoRA adapts nn.Linear layers only"
            )
        found[name] = module
    if not found:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise ValueError(
            f"no module matches target_modules={shown!r}; the model's nn.Linear modules are named {linear_names}"
        )
    return found


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


def to_device(batch, device: torch.device):
    """Move the tensors of a dict batch to the model's device; anything else is left to loss_fn."""
    if isinstance(batch, Mapping):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return batch


def layer_importances(accumulator: GradientAccumulator, weights: Dict[str, nn.Parameter], metric: str) -> Dict[str, float]:
    return {name: layer_importance(metric, weight, accumulator.mean(name)) for name, weight in weights.items()}


def estimate_gradients(
    model: nn.Module,
    batches: Iterator,
    config: GoRAConfig,
    weights: Dict[str, nn.Parameter],
    *,
    loss_fn: Optional[LossFn] = None,
    device: Optional[torch.device] = None,
) -> tuple:
    """Run up to ``config.grad_steps`` backward passes; return (accumulator, importance per layer).

    With ``adaptive_grad_steps`` the importances of the running mean are recomputed each step and
    estimation stops once no layer's changes by more than ``adaptive_threshold`` (relative), after
    at least ``adaptive_min_steps`` steps.
    """
    accumulator = GradientAccumulator(weights)
    importance = None
    with gradients_only_for(model, weights), accumulator, torch.enable_grad():
        for step in range(1, config.grad_steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"the batches ran out after {step - 1} of grad_steps={config.grad_steps} gradient steps; "
                    "pass more batches or lower grad_steps"
                ) from None
            loss = batch_loss(model, to_device(batch, device) if device else batch, loss_fn, f"gradient step {step}")
            loss.backward()
            accumulator.end_step()
            if config.adaptive_grad_steps:
                previous, importance = importance, layer_importances(accumulator, weights, config.importance)
                settled = previous is not None and relative_change(previous, importance) <= config.adaptive_threshold
                if settled and step >= config.adaptive_min_steps:
                    break
    if importance is None:
        importance = layer_importances(accumulator, weights, config.importance)
    return accumulator, importance


def _model_device(model: nn.Module) -> Optional[torch.device]:
    param = next(model.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


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
    """
    config = config or GoRAConfig()
    targets = find_target_modules(model, config.target_modules)
    weights = {name: module.weight for name, module in targets.items()}
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    device = _model_device(model)
    batch_iter = iter(batches)

    start = time.perf_counter()
    accumulator, importance = estimate_gradients(model, batch_iter, config, weights, loss_fn=loss_fn, device=device)
    gradient_seconds = time.perf_counter() - start

    notes = []
    for name, value in importance.items():
        if value == 0:
            notes.append(f"{name}: zero gradient over all steps, given rank_min={config.rank_min}")
        if min(shapes[name]) < config.rank_min:
            notes.append(f"{name}: rank capped at min(in, out) = {min(shapes[name])} < rank_min")
    advantage = normalize_importance(importance)
    ranks = allocate_ranks(
        advantage, shapes, rank_ref=config.rank_ref, rank_min=config.rank_min, rank_max=config.rank_max,
        features=config.rank_features, rounding=config.rank_rounding,
    )

    saved_flags = [(param, param.requires_grad) for param in model.parameters()]
    adapters: Dict[str, GoRALinear] = {}
    unit_b: Dict[str, torch.Tensor] = {}  # B0 at γ = 1, kept only for the adaptive-γ search
    layers: Dict[str, LayerReport] = {}
    try:
        for name, base in targets.items():
            rank, error = ranks[name], None
            if rank > 0:
                adapters[name], error = _init_adapter(name, base, rank, accumulator.mean(name), config)
                if config.adaptive_gamma:
                    unit_b[name] = adapters[name].lora_B.detach().clone()
            accumulator.release(name)
            layers[name] = LayerReport(
                name=name, shape=shapes[name], importance=importance[name], advantage=advantage[name], rank=rank,
                params=(shapes[name][0] + shapes[name][1]) * rank, projection_error=error,
            )
        for name, adapter in adapters.items():
            set_submodule(model, name, adapter)
        mark_only_adapters_trainable(model)
        gamma, trials = config.gamma, []
        if config.adaptive_gamma:
            gamma, trials = _adaptive_gamma(model, adapters, unit_b, batch_iter, held_batch, loss_fn, device, config)
    except BaseException:
        for name, base in targets.items():
            set_submodule(model, name, base)
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        raise

    return GoRAReport(
        config=config, layers=layers, grad_steps=accumulator.steps, gamma=gamma,
        rank_budget=rank_budget(shapes, config.rank_ref, config.rank_features),
        param_budget=lora_reference_count(shapes, config.rank_ref), param_count=lora_param_count(shapes, ranks),
        notes=notes, gamma_search=trials,
        timings={"gradient_s": gradient_seconds, "init_s": time.perf_counter() - start - gradient_seconds},
    )


def _init_adapter(name: str, base: nn.Linear, rank: int, mean_grad: torch.Tensor, config: GoRAConfig):
    """A GoRALinear around ``base`` with A0 from the name-seeded generator and B0 from Ḡ (γ = 1 when adaptive)."""
    adapter = GoRALinear(base, rank, alpha=config.alpha, use_rslora=config.use_rslora, dropout=config.dropout)
    lora_a = kaiming_uniform_a(rank, base.in_features, seed=config.seed, module_name=name)
    gamma = 1.0 if config.adaptive_gamma else config.gamma
    try:
        lora_b, error = gora_init_b(mean_grad, lora_a.to(mean_grad.device), gamma=gamma, scaling=adapter.scaling)
    except ValueError as failure:
        raise ValueError(f"{name} (rank {rank}, weight {tuple(base.weight.shape)}): {failure}") from failure
    with torch.no_grad():
        adapter.lora_A.copy_(lora_a)
        adapter.lora_B.copy_(lora_b)
    return adapter, error


def _adaptive_gamma(model, adapters, unit_b, batch_iter, held_batch, loss_fn, device, config):
    """Run the γ search on the held batch (default: the next batch after the gradient steps)."""
    if held_batch is None:
        held_batch = next(batch_iter, None)
        if held_batch is None:
            raise ValueError(
                "adaptive_gamma needs a held batch: pass held_batch= or one batch more than grad_steps"
            )
    held_batch = to_device(held_batch, device) if device else held_batch
    was_training = model.training
    model.eval()  # dropout off: candidates are compared on the same function

    def held_loss() -> float:
        return float(batch_loss(model, held_batch, loss_fn, "adaptive gamma (held batch)", require_finite=False))

    try:
        return search_gamma(adapters, unit_b, held_loss, gamma_candidates(config))
    finally:
        model.train(was_training)
