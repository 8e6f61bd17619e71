"""The GoRA pipeline over any engine: estimation → importance → rank map → A0/B0, as a GoRAPlan.

One code path for one process and for many: the engine says what this rank owns, the pure
functions (``importance``, ``allocation``, ``initialization``, ``shards``) do the math on it, and
``Collective`` adds the pieces up across ranks (no-ops on one process). What crosses the wire:

- per gradient step, two failure flags (one float per rank each), plus with adaptive N the
  per-layer partial sums (3 floats per layer);
- once, the per-layer partial sums (3 floats per layer: Σ|W⊙Ḡ|, count, ‖Ḡ‖²), the rank map (1 int per layer, broadcast),
  and C = Ḡ·A0ᵀ (out × r per layer: the size of the adapters' B, not of any gradient).

No rank ever holds a full gradient, except one layer at a time on one rank for the nuclear-norm
importance metrics. A GoRAPlan holds the full A0 and B0 on every rank (adapter-sized) so that the
user's training code can apply it before wrapping the model in its engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from gora_dist.kernels import projected_gradient, triton_can_run

from .allocation import allocate_ranks, lora_param_count, lora_reference_count, rank_budget
from .collectives import Collective, GoRADistributedError
from .config import GoRAConfig
from .gradients import ShardedAccumulator
from .importance import abs_wg_partial_sum, normalize_importance, nuclear_norm, nuclear_norm_refusal, relative_change
from .initialization import b0_scale, gram_cholesky, kaiming_uniform_a, projected_energy, residual_ratio, rslora_scaling, solve_b0
from .apply_utils import free_memory_bytes, transformer_blocks
from .gather import full_parameters, under, write_full
from .replicated import average_beside_shards
from .gelora import HiddenStateSampler, block_ranks, gelora_rank_map, level_dimensions
from .layers import GoRALinear, install_adapters, saved_modules
from .memory_trace import phase
from .report import GoRAReport, LayerReport
from .shards import FlatShard, add_shard_product

C_BUCKET_ELEMENTS = 16 * 2**20  # all-reduce C in buckets of at most 64 MB of float32


@dataclass
class GoRAPlan:
    """Everything needed to put GoRA's initial adapters into a model: the report (rank map,
    importances, config) and A0 (r, in), B0 (out, r) per adapted layer, float32 on the CPU."""

    report: GoRAReport
    lora_a: Dict[str, torch.Tensor]
    lora_b: Dict[str, torch.Tensor]
    saved_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Full weights of ``config.modules_to_save`` ({"classifier.weight": ...}), trained in full."""

    @property
    def rank_map(self) -> Dict[str, int]:
        return self.report.rank_map


# --- estimation -------------------------------------------------------------------------------------

def _partial_sums(engine, accumulator: ShardedAccumulator, names: List[str]) -> torch.Tensor:
    """(layers, 3) float64: Σ|W⊙Ḡ|, element count and ‖Ḡ‖² over what this rank owns."""
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    for index, name in enumerate(names):
        mean = accumulator.mean(name)
        if mean.numel():
            total, count = abs_wg_partial_sum(engine.local_weight(name), mean)
            sums[index] = torch.tensor([total, count, float(mean.double().square().sum())])
    return sums


def _gather_full(collective: Collective, local: torch.Tensor, shard: FlatShard, owner: int, phase: str):
    """The full (rows, cols) matrix on ``owner`` from every rank's flat shard (None elsewhere).

    Built with all-reduce of a zero-padded full buffer, one layer at a time: simple, works on every
    backend; only for the nuclear-norm metrics, which need the whole matrix by definition.
    """
    full = torch.zeros(shard.rows * shard.cols, dtype=torch.float32, device=collective.device)
    full[shard.start:shard.stop] = local.to(device=full.device, dtype=torch.float32)
    collective.all_reduce(full, phase)
    return full.view(shard.rows, shard.cols) if collective.rank == owner else None


def _importances(engine, accumulator, names, metric: str, collective: Collective):
    """(importance per layer, the summed (layers, 3) partial sums) — the same on every rank."""
    sums = collective.all_reduce(_partial_sums(engine, accumulator, names), "importance partial sums")
    if metric == "mean_abs_wg":
        return {name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(names)}, sums
    values = torch.zeros(len(names), dtype=torch.float64)
    for index, name in enumerate(names):
        owner = index % collective.world_size
        grad = _gather_full(collective, accumulator.mean(name), engine.shard(name), owner, f"gather {name}")
        if metric == "wg_nuclear":
            weight = _gather_full(collective, engine.local_weight(name), engine.shard(name), owner, f"gather {name} weight")
        if grad is not None:
            values[index] = nuclear_norm(grad if metric == "grad_nuclear" else weight * grad)
    collective.all_reduce(values, "nuclear-norm importances")
    return {name: float(values[i]) for i, name in enumerate(names)}, sums


def estimate_gradients(engine, batches: Iterator, config: GoRAConfig, *, loss_fn=None,
                       collective: Optional[Collective] = None):
    """N forward/backward passes through the engine; failures on any rank are agreed on, not hung on.

    Returns (accumulator of owned float32 gradient sums, importance per layer, ‖Ḡ‖² per layer).
    """
    collective = collective or Collective()
    names = list(engine.targets)
    accumulator = ShardedAccumulator({n: engine.shard(n).numel for n in names}, engine.device)
    importance = sums = None
    with torch.enable_grad():
        for step in range(1, config.grad_steps + 1):
            # 1. every rank has a usable batch, before any rank enters the engine's forward collectives
            problem, batch, loss = None, None, None
            try:
                batch = next(batches)
                if loss_fn is None and not isinstance(batch, Mapping):
                    problem = f"gradient step {step}: batch is a {type(batch).__name__}; pass dicts of model inputs, or loss_fn="
            except StopIteration:
                problem = (f"the batches ran out after {step - 1} of grad_steps={config.grad_steps} gradient steps; "
                           "pass more batches or lower grad_steps")
            collective.check(problem, f"gradient step {step} (batch)")
            # 2. every rank has a finite scalar loss (the forward's collectives are behind us)
            try:
                loss = engine.loss(batch, loss_fn, f"gradient step {step}")
            except ValueError as failure:
                problem = str(failure)
            collective.check(problem, f"gradient step {step} (loss)")
            engine.backward(loss, accumulator.add)
            collective.check(accumulator.end_step(), f"gradient step {step} (gradients)")
            if config.adaptive_grad_steps:
                previous = importance
                importance, sums = _importances(engine, accumulator, names, config.importance, collective)
                settled = previous is not None and relative_change(previous, importance) <= config.adaptive_threshold
                if settled and step >= config.adaptive_min_steps:
                    break
    if importance is None:
        importance, sums = _importances(engine, accumulator, names, config.importance, collective)
    return accumulator, importance, sums[:, 2]


# --- rank map -------------------------------------------------------------------------------------

def _agreed_rank_map(ranks: Dict[str, int], collective: Collective) -> Dict[str, int]:
    """Rank 0's map is broadcast; every rank compares it with its own and all fail together on a mismatch."""
    names = list(ranks)
    mine = torch.tensor([ranks[n] for n in names], dtype=torch.int64)
    broadcast = collective.broadcast(mine.clone(), "rank map broadcast", src=0)
    differing = [n for n, a, b in zip(names, mine.tolist(), broadcast.tolist()) if a != b]
    problem = None
    if differing:
        problem = (f"own rank map differs from rank 0's at {differing[:3]} "
                   f"(own {[ranks[n] for n in differing[:3]]}, rank 0 {[int(broadcast[names.index(n)]) for n in differing[:3]]})")
    collective.check(problem, "rank map agreement")
    collective.agree(broadcast.tolist(), "rank map hash")
    return {name: int(rank) for name, rank in zip(names, broadcast.tolist())}


# --- GeLoRA sample ----------------------------------------------------------------------------------

def _recording_masks(batches, sampler: HiddenStateSampler):
    """Pass batches through, telling the sampler which tokens each one's attention mask keeps."""
    for batch in batches:
        sampler.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        yield batch


def _gathered_points(local: torch.Tensor, collective: Collective) -> torch.Tensor:
    """Every rank's (levels, n_rank, hidden) points on every rank, in rank order."""
    counts = torch.zeros(collective.world_size, dtype=torch.float64)
    counts[collective.rank] = local.shape[1]
    counts = collective.all_reduce(counts, "GeLoRA point counts").long().tolist()
    full = torch.zeros(local.shape[0], sum(counts), local.shape[2], dtype=torch.float32)
    offset = sum(counts[:collective.rank])
    full[:, offset:offset + local.shape[1]] = local
    return collective.all_reduce(full, "GeLoRA hidden-state points")


# --- initialisation -------------------------------------------------------------------------------

def _add_projection(part: torch.Tensor, grad_flat: torch.Tensor, shard: FlatShard, a0: torch.Tensor,
                    use_kernel: bool) -> None:
    """part (rows, r) += this shard's share of C = Ḡ·A0ᵀ.

    use_kernel (CUDA shards with triton and GORA_KERNELS=1): the rows lying wholly inside
    the shard go through the Triton kernel (``gora_dist.kernels.pinv_solve``, one read of the shard);
    a row cut by a ZeRO-3 partition boundary at either end stays with ``add_shard_product``. Otherwise
    (and always on the CPU) ``add_shard_product`` does it all, exactly as before.
    """
    cols = shard.cols
    first_row = -(-shard.start // cols)  # first row starting inside the shard
    end_row = shard.stop // cols  # rows [first_row, end_row) lie wholly inside it
    if not use_kernel or end_row <= first_row:
        add_shard_product(part, grad_flat, shard, a0)
        return
    head = first_row * cols - shard.start
    body = (end_row - first_row) * cols
    if head:
        add_shard_product(part, grad_flat[:head], FlatShard(shard.start, first_row * cols, shard.rows, cols), a0)
    part[first_row:end_row] += projected_gradient(grad_flat[head:head + body].view(-1, cols), a0)
    if head + body < shard.numel:
        add_shard_product(part, grad_flat[head + body:], FlatShard(end_row * cols, shard.stop, shard.rows, cols), a0)


def _projected_gradients(engine, accumulator, lora_a: Dict[str, torch.Tensor], collective: Collective):
    """C = Ḡ·A0ᵀ per layer, summed over ranks (partial rows included) in buckets; frees each sum."""
    projected, bucket, bucket_size = {}, [], 0

    def flush():
        nonlocal bucket, bucket_size
        if bucket:
            flat = torch.cat([projected[name].reshape(-1) for name in bucket])
            collective.all_reduce(flat, f"C = G·A0ᵀ for {len(bucket)} layers")
            offset = 0
            for name in bucket:
                size = projected[name].numel()
                projected[name] = flat[offset:offset + size].view_as(projected[name])
                offset += size
        bucket, bucket_size = [], 0

    for name, a0 in lora_a.items():
        shard = engine.shard(name)
        part = torch.zeros(shard.rows, a0.shape[0], dtype=torch.float32, device=accumulator.sums[name].device)
        grad_flat = accumulator.mean(name)
        _add_projection(part, grad_flat, shard, a0, use_kernel=grad_flat.is_cuda and triton_can_run(grad_flat))
        accumulator.release(name)
        projected[name] = part
        bucket.append(name)
        bucket_size += part.numel()
        if bucket_size >= C_BUCKET_ELEMENTS:
            flush()
    flush()
    return projected


def build_plan(engine, batches, config: GoRAConfig, *, loss_fn=None, collective: Optional[Collective] = None) -> GoRAPlan:
    """Run GoRA's estimation and initialisation through ``engine``; every rank returns the same plan.

    batches: this rank's batches (each rank its own slice of the global batch, equal micro-batch
    sizes, so the mean over ranks is the global batch's gradient).
    """
    collective = collective or Collective()
    names = list(engine.targets)
    shapes = {name: (engine.shard(name).rows, engine.shard(name).cols) for name in names}
    collective.agree([[name, list(shape)] for name, shape in shapes.items()] + [config.to_dict()],
                     "target layers and config")
    if config.importance != "mean_abs_wg":
        collective.check(nuclear_norm_refusal(config.importance, shapes, free_memory_bytes(engine.device)),
                         "importance metric")
    if config.adaptive_gamma and collective.active:
        raise ValueError("adaptive_gamma runs on one process only for now; set gamma explicitly for sharded runs")

    sampler = None
    if config.allocator == "gelora":
        blocks = transformer_blocks(engine.model)
        if not blocks:
            raise ValueError("allocator=gelora needs the model's transformer blocks (its _no_split_modules); none found")
        sampler = HiddenStateSampler(engine.model.get_input_embeddings(), blocks)
        batches = _recording_masks(batches, sampler)

    saved_state = {}
    if config.modules_to_save:
        saved_state = full_parameters(engine.model, under(saved_modules(engine.model, config.modules_to_save)))

    start = time.perf_counter()
    try:
        accumulator, importance, energies = estimate_gradients(engine, iter(batches), config, loss_fn=loss_fn,
                                                               collective=collective)
    finally:
        if sampler is not None:
            sampler.close()
    gradient_seconds = time.perf_counter() - start
    phase("init")

    notes = []
    for name, value in importance.items():
        if value == 0:
            notes.append(f"{name}: zero gradient over all steps, given rank_min={config.rank_min}")
        if min(shapes[name]) < config.rank_min:
            notes.append(f"{name}: rank capped at min(in, out) = {min(shapes[name])} < rank_min")
    advantage = normalize_importance(importance)
    dimensions = []
    if sampler is None:
        ranks = allocate_ranks(advantage, shapes, rank_ref=config.rank_ref, rank_min=config.rank_min,
                               rank_max=config.rank_max, features=config.rank_features, rounding=config.rank_rounding,
                               fit_budget=config.fit_budget)
    else:
        points = _gathered_points(sampler.stacked(), collective)
        dimensions = level_dimensions(points, config.gelora_method)
        ranks, gelora_notes = gelora_rank_map(
            block_ranks(dimensions, config.gelora_offset), sampler.block_names, shapes, rank_ref=config.rank_ref,
            rank_min=config.rank_min, rank_max=config.rank_max, scale_to_budget=config.gelora_scale_to_budget)
        notes += gelora_notes + [f"GeLoRA: TwoNN ({config.gelora_method}) on {points.shape[1]} mean-pooled sequences"]
    ranks = _agreed_rank_map(ranks, collective)

    adapted = [name for name in names if ranks[name] > 0]
    accumulator_elements = accumulator.held_elements()
    lora_a = {name: kaiming_uniform_a(ranks[name], shapes[name][1], seed=config.seed, module_name=name) for name in adapted}
    for name in names:
        if name not in lora_a:
            accumulator.release(name)
    projected = _projected_gradients(engine, accumulator, lora_a, collective)

    lora_b, layers = {}, {}
    gamma = 1.0 if config.adaptive_gamma else config.gamma
    for index, name in enumerate(names):
        rank, error = ranks[name], None
        if rank > 0:
            try:
                factor = gram_cholesky(lora_a[name])
            except ValueError as failure:
                raise ValueError(f"{name} (rank {rank}, weight {shapes[name]}): {failure}") from failure
            kept = projected_energy(projected[name], factor)
            error = residual_ratio(float(energies[index]), kept)
            scaling = rslora_scaling(config.alpha, rank, config.use_rslora)
            if gamma == 0:
                lora_b[name] = torch.zeros(shapes[name][0], rank, dtype=torch.float32)
            else:
                xi = b0_scale(gamma, scaling, shapes[name][1], rank)
                lora_b[name] = solve_b0(projected[name], factor, xi).cpu()
            del projected[name]
        layers[name] = LayerReport(
            name=name, shape=shapes[name], importance=importance[name], advantage=advantage[name], rank=rank,
            params=(shapes[name][0] + shapes[name][1]) * rank, projection_error=error,
        )
    report = GoRAReport(
        config=config, layers=layers, grad_steps=accumulator.steps, gamma=config.gamma,
        rank_budget=rank_budget(shapes, config.rank_ref, config.rank_features),
        param_budget=lora_reference_count(shapes, config.rank_ref), param_count=lora_param_count(shapes, ranks),
        notes=notes, accumulator_elements=accumulator_elements, intrinsic_dimensions=dimensions,
        timings={"gradient_s": gradient_seconds, "init_s": time.perf_counter() - start - gradient_seconds,
                 "bytes_communicated": float(collective.bytes_sent)},
    )
    return GoRAPlan(report=report, lora_a=lora_a, lora_b=lora_b, saved_state=saved_state)


# --- applying a plan ------------------------------------------------------------------------------

def apply_plan(model: nn.Module, plan: GoRAPlan) -> Dict[str, GoRALinear]:
    """Wrap every planned layer of ``model`` in a GoRALinear holding the plan's A0 and B0; freeze
    everything else. Checks every layer before changing anything.

    ``model`` is unwrapped, or still sharded by the estimation: ZeRO-3 partitioned (then
    ``deepspeed.initialize`` it), or FSDP2 ``fully_shard``-ed (train it as it is: the adapters are
    replicated on every rank and their gradients averaged at the end of each backward, see
    ``gora_dist.replicated``).

    On a meta-device model the adapters are created on meta too; fill them after materialising
    with :func:`copy_plan_into_adapters`.
    """
    config = plan.report.config
    weights = {name: (plan.lora_a[name], plan.lora_b[name]) for name in plan.lora_a}
    adapters = install_adapters(model, weights, alpha=config.alpha, use_rslora=config.use_rslora, dropout=config.dropout,
                                modules_to_save=config.modules_to_save, saved_state=plan.saved_state)
    # an FSDP2 model: the new adapters are replicated, their gradients averaged per backward
    average_beside_shards(model, [p for m in adapters.values() for p in (m.lora_A, m.lora_B)])
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


__all__ = ["GoRAPlan", "build_plan", "estimate_gradients", "apply_plan", "copy_plan_into_adapters", "GoRADistributedError"]
