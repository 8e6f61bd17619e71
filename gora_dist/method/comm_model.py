"""Bytes GoRA's own collectives hand over per rank (payload), as a formula of the model and run.

The same formula is checked against the bytes counted in a real multi-process run
(tests/test_distributed.py), so it can be trusted for cluster sizes we cannot run. The engine's own
traffic (gradient reduce-scatter / all-reduce of the target weights, parameter all-gathers) is that
of N ordinary training steps with only the target weights trainable, and is not counted here.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

FLOAT64, FLOAT32, INT64 = 8, 4, 8


def gora_collective_bytes(
    shapes: Mapping[str, Tuple[int, int]],
    ranks: Mapping[str, int],
    *,
    world_size: int,
    steps: int,
    importance: str = "mean_abs_wg",
    adaptive_steps: bool = False,
    gelora_points: Optional[Tuple[int, int, int]] = None,
) -> int:
    """Payload bytes one rank hands to GoRA's collectives in ``build_plan`` (0 on one process).

    shapes: (out, in) per target layer; ranks: the rank map; steps: gradient steps actually run;
    gelora_points: (levels, sequences over all ranks, hidden) with allocator=gelora.
    """
    if world_size <= 1:
        return 0
    layers = len(shapes)
    flag_check = world_size * FLOAT64          # Collective.check: one float64 per rank
    agree = 2 * FLOAT64                        # Collective.agree: MIN and MAX of one hash
    importance_round = 3 * layers * FLOAT64    # Σ|W⊙Ḡ|, count, ‖Ḡ‖² per layer
    if importance != "mean_abs_wg":            # plus one zero-padded full matrix per layer (two for W⊙Ḡ)
        matrices = 1 if importance == "grad_nuclear" else 2
        importance_round += sum(out * inp for out, inp in shapes.values()) * FLOAT32 * matrices + layers * FLOAT64
    total = agree                                            # target layers and config
    if importance != "mean_abs_wg":
        total += flag_check                                  # does one layer's matrix fit on every rank?
    total += steps * 3 * flag_check                          # batch, loss and gradient checks per step
    total += (steps if adaptive_steps else 1) * importance_round
    if gelora_points is not None:                            # point counts, then every rank's points
        levels, sequences, hidden = gelora_points
        total += world_size * FLOAT64 + levels * sequences * hidden * FLOAT32
    total += layers * INT64 + flag_check + agree             # rank map: broadcast, check, hash
    total += sum(shapes[name][0] * rank for name, rank in ranks.items()) * FLOAT32  # C = Ḡ·A0ᵀ
    return total
