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
from typing import Callable, Dict, Optional

import torch

from gora_dist.comm.collectives import Collective
from gora_dist.comm.gather import full_parameters, under
from gora_dist.config import GoRAConfig
from gora_dist.engines.accumulator import ShardedAccumulator
from gora_dist.kernels import projected_gradient, triton_can_run
from gora_dist.method.allocation import (
    allocate_ranks,
    lora_param_count,
    lora_reference_count,
    rank_budget,
    uniform_ranks,
)
from gora_dist.method.gelora import block_ranks, gelora_rank_map, level_dimensions
from gora_dist.method.importance import normalize_importance, nuclear_norm_refusal
from gora_dist.method.initialization import (
    b0_scale,
    gram_cholesky,
    kaiming_uniform_a,
    projected_energy,
    residual_ratio,
    rslora_scaling,
    solve_b0,
)
from gora_dist.method.shards import FlatShard, add_shard_product
from gora_dist.model.devices import free_memory_bytes
from gora_dist.model.hidden_states import HiddenStateSampler
from gora_dist.model.quantized import quantized_offset_refusal
from gora_dist.model.targets import saved_modules, transformer_blocks
from gora_dist.pipeline.estimation import estimate_gradients
from gora_dist.pipeline.svd_init import rank_refusal, svd_factors
from gora_dist.report import GoRAPlan, GoRAReport, LayerReport

C_BUCKET_ELEMENTS = 16 * 2**20  # all-reduce C in buckets of at most 64 MB of float32


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


def _gora_factors(engine, accumulator, names, ranks, shapes, importance, advantage, energies, config: GoRAConfig,
                  collective: Collective):
    """GoRA's A0 (seeded Kaiming) and B0 (the pseudo-inverse solve from C = Ḡ·A0ᵀ), and the layers' reports."""
    adapted = [name for name in names if ranks[name] > 0]
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
    return lora_a, lora_b, layers


def build_plan(engine, batches, config: GoRAConfig, *, loss_fn=None, collective: Optional[Collective] = None,
               on_phase: Optional[Callable[[str], None]] = None) -> GoRAPlan:
    """Run GoRA's estimation and initialisation through ``engine``; every rank returns the same plan.

    batches: this rank's batches (each rank its own slice of the global batch, equal micro-batch
    sizes, so the mean over ranks is the global batch's gradient). on_phase: called with "init" once
    the gradient steps are done (a caller's instrumentation, e.g. ``memory_trace.phase``).
    """
    collective = collective or Collective()
    refusal = quantized_offset_refusal(engine.targets, config.initializer)  # the same model on every rank: no collective
    if refusal is not None:
        raise ValueError(refusal)
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
    if config.needs_gradients:
        try:
            accumulator, importance, energies = estimate_gradients(engine, iter(batches), config, loss_fn=loss_fn,
                                                                   collective=collective)
        finally:
            if sampler is not None:
                sampler.close()
    else:  # PiSSA with uniform ranks reads only the weights: no batch is drawn, no backward runs
        accumulator, importance, energies = ShardedAccumulator({}, engine.device), dict.fromkeys(names, 0.0), None
    gradient_seconds = time.perf_counter() - start
    if on_phase is not None:
        on_phase("init")

    notes = [] if config.needs_gradients else [
        "no gradient steps: initializer=pissa with allocator=uniform reads only the weights (importances not measured)"]
    for name, value in importance.items():
        if value == 0 and config.needs_gradients:
            notes.append(f"{name}: zero gradient over all steps, given rank_min={config.rank_min}")
        if min(shapes[name]) < config.rank_min:
            notes.append(f"{name}: rank capped at min(in, out) = {min(shapes[name])} < rank_min")
    advantage = normalize_importance(importance) if config.needs_gradients else dict.fromkeys(names, 0.0)
    dimensions = []
    if config.allocator == "uniform":
        ranks = uniform_ranks(shapes, config.rank_ref)
    elif sampler is None:
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

    accumulator_elements = accumulator.held_elements()
    if config.initializer != "gora":
        collective.check(rank_refusal(config, ranks, shapes), "initializer ranks")
        lora_a, lora_b, _ = svd_factors(engine, accumulator, ranks, config, collective)
        layers = {name: LayerReport(name=name, shape=shapes[name], importance=importance[name],
                                    advantage=advantage[name], rank=ranks[name],
                                    params=(shapes[name][0] + shapes[name][1]) * ranks[name], projection_error=None)
                  for name in names}
        notes.append(f"initializer={config.initializer}: A0/B0 from the {config.svd} SVD of "
                     f"{'W' if config.initializer == 'pissa' else 'Ḡ'} over the shards")
    else:
        lora_a, lora_b, layers = _gora_factors(engine, accumulator, names, ranks, shapes, importance, advantage,
                                               energies, config, collective)
    report = GoRAReport(
        config=config, layers=layers, grad_steps=accumulator.steps, gamma=config.gamma,
        rank_budget=rank_budget(shapes, config.rank_ref, config.rank_features),
        param_budget=lora_reference_count(shapes, config.rank_ref), param_count=lora_param_count(shapes, ranks),
        notes=notes, accumulator_elements=accumulator_elements, intrinsic_dimensions=dimensions,
        timings={"gradient_s": gradient_seconds, "init_s": time.perf_counter() - start - gradient_seconds,
                 "bytes_communicated": float(collective.bytes_sent)},
    )
    return GoRAPlan(report=report, lora_a=lora_a, lora_b=lora_b, saved_state=saved_state)


