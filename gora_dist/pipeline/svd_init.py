"""LoRA-GA, LoRA-One and PiSSA's A0/B0 from the engine's shards: each rank passes the part of Ḡ
(the estimation's float32 mean) or of W it owns to the sharded SVD, whose sums go through the
collective; every rank ends with the same adapter-sized factors. No rank forms a full Ḡ or W."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from gora_dist.comm.collectives import Collective
from gora_dist.config import GoRAConfig
from gora_dist.method.initialization import rslora_scaling
from gora_dist.method.initializers import (
    LORA_GA_STABLE_GAMMA,
    LORA_ONE_GAMMA,
    lora_ga_factors,
    lora_one_factors,
    pissa_factors,
)
from gora_dist.method.sharded_svd import sharded_svd, svd_traffic_elements

TRIPLETS_PER_RANK = {"lora_ga": 2, "lora_one": 1, "pissa": 1}
"""Singular triplets each method reads per unit of adapter rank (LoRA-GA: r for A, the next r for B)."""


def rank_refusal(config: GoRAConfig, ranks: Dict[str, int], shapes: Dict[str, Tuple[int, int]]):
    """A message naming the layers whose rank the initializer cannot fill, or None."""
    per = TRIPLETS_PER_RANK.get(config.initializer)
    if per is None:
        return None
    bad = [f"{name} (rank {rank}, weight {shapes[name][0]}x{shapes[name][1]})" for name, rank in ranks.items()
           if per * rank > min(shapes[name])]
    if not bad:
        return None
    return (f"initializer={config.initializer} needs {per} x rank <= min(out, in) singular triplets; too few in "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}: lower rank_max or leave these layers out")


def svd_factors(engine, accumulator, ranks: Dict[str, int], config: GoRAConfig,
                collective: Collective) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], int]:
    """(A0, B0 per adapted layer on the CPU, float32 elements this rank sent into the SVD's sums).
    Releases each layer's gradient sums once used."""
    lora_a, lora_b, sent = {}, {}, 0
    for name, rank in ranks.items():
        if rank == 0:
            accumulator.release(name)
            continue
        shard = engine.shard(name)
        if config.initializer == "pissa":
            flat = engine.local_weight(name).to(torch.float32)
        else:
            flat = accumulator.mean(name)
            flat = -flat if config.initializer == "lora_one" else flat
        needed = TRIPLETS_PER_RANK[config.initializer] * rank
        smallest = min(shard.rows, shard.cols)
        oversample, iters = (smallest, 0) if config.svd == "exact" else (config.svd_oversample, config.svd_power_iters)
        u, s, vh = sharded_svd([(flat, shard)], needed, collective.all_reduce, oversample=oversample,
                               power_iters=iters, seed=config.seed, name=name)
        sent += svd_traffic_elements(shard.rows, shard.cols, needed, oversample, iters)
        del flat
        accumulator.release(name)
        scaling = rslora_scaling(config.alpha, rank, config.use_rslora)
        if config.initializer == "lora_ga":
            a0, b0 = lora_ga_factors(u, s, vh, rank, stable_gamma=config.stable_gamma or LORA_GA_STABLE_GAMMA)
        elif config.initializer == "lora_one":
            a0, b0 = lora_one_factors(u, s, vh, rank, gamma=config.stable_gamma or LORA_ONE_GAMMA)
        else:
            a0, b0 = pissa_factors(u, s, vh, rank, scaling)
        lora_a[name], lora_b[name] = a0.cpu(), b0.cpu()
    return lora_a, lora_b, sent
