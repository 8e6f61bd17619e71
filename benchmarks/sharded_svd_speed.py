#!/usr/bin/env python3
"""The sharded randomized SVD (gora_dist/method/sharded_svd.py) at a model's target shapes, beside
the two SVDs PEFT's PiSSA uses on one device: torch.linalg.svd (exact) and torch.svd_lowrank
(its ``pissa_niter_N`` option).

    python benchmarks/sharded_svd_speed.py                 # Llama-3.2-1B's shapes on this machine's device
    python benchmarks/sharded_svd_speed.py --quick         # small shapes, a few seconds (checks the script)

For each distinct target shape and adapter rank (8: PiSSA at r = 8; 16: LoRA-GA's 2r; 64: LoRA-GA's 2r at
GoRA's r_max 32), seconds of: ours on the whole matrix (world 1); ours on one rank's flat slice at world 8
(ZeRO-3's partition: that rank's compute, the sums' traffic not included); torch.linalg.svd; torch.svd_lowrank
with the same width and power iterations. The error is the largest relative error of the leading singular
values against the exact ones, on a random matrix with a power-law spectrum (a flat spectrum is the
randomized SVD's worst case; trained weights and averaged gradients decay). Bytes: what one rank sends into
the sums (svd_traffic_elements × 4) beside the bf16 weight a gather would move. The whole-model line sums
the per-shape seconds over every target layer. The GPU suite runs :func:`measure` on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cluster_model import target_shapes as layer_shapes  # noqa: E402
from timing import timed  # noqa: E402

# Llama-3.2-1B: hidden 2048, intermediate 8192, 16 layers, 32 heads of 64, 8 KV heads
LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8)
SMALL = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
RANKS = (8, 16, 64)
WORLD = 8


def _defaults():
    """GoRAConfig's randomized-SVD settings: what LoRA-GA / LoRA-One / PiSSA run with by default."""
    from gora_dist.config import GoRAConfig

    config = GoRAConfig()
    return config.svd_oversample, config.svd_power_iters


OVERSAMPLE, POWER_ITERS = _defaults()


def target_shapes(spec: dict) -> Dict[Tuple[int, int], List[str]]:
    """(out, in) → the projections of one decoder layer with that shape (cluster_model's layer table)."""
    kv = spec["kv_heads"] * (spec["hidden"] // spec["heads"])
    grouped: Dict[Tuple[int, int], List[str]] = {}
    for name, shape in layer_shapes(spec["hidden"], spec["intermediate"], 1, kv).items():
        grouped.setdefault(shape, []).append(name.split(".", 1)[1] + "_proj")
    return grouped


def decaying_matrix(rows: int, cols: int, device, seed: int = 0):
    """A float32 (rows × cols) matrix with singular values falling as 1/j (times random-matrix noise)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    inner = min(rows, cols)
    left = torch.randn(rows, inner, generator=generator) / inner**0.5
    right = torch.randn(inner, cols, generator=generator) / cols**0.5
    scale = 1.0 / torch.arange(1, inner + 1, dtype=torch.float32)
    return ((left * scale) @ right).to(device)


def measure(spec: dict, device: str, ranks: Sequence[int] = RANKS, repeats: int = 3) -> List[dict]:
    """One row per (shape, rank): the four timings, the error, the bytes."""
    import torch

    from gora_dist.method.shards import FlatShard
    from gora_dist.method.sharded_svd import sharded_svd, svd_traffic_elements

    def no_reduce(tensor, what):  # one process: its contribution is the sum
        return tensor

    rows_out = []
    for (rows, cols), names in target_shapes(spec).items():
        matrix = decaying_matrix(rows, cols, device)
        flat = matrix.reshape(-1)
        whole = [(flat, FlatShard.whole(rows, cols))]
        part = FlatShard.even_partition(WORLD // 2 - 1, WORLD, rows, cols)  # a middle rank: its slice cuts rows
        sliced = [(flat[part.start:part.stop], part)]
        # the reference values (float32 SVD: ~1e-6 relative, far below the errors measured), which also warms
        # the exact path up; then one timed call, the slowest thing here on a GPU
        exact_values = torch.linalg.svdvals(matrix).double()
        exact_s = timed(lambda: torch.linalg.svd(matrix, full_matrices=False), 1, warmup=0)
        for rank in ranks:
            if rank > min(rows, cols):
                continue
            width = min(rank + OVERSAMPLE, rows, cols)
            _, values, _ = sharded_svd(whole, rank, no_reduce, oversample=OVERSAMPLE, power_iters=POWER_ITERS)
            error = float(((values.cpu() - exact_values[:rank].cpu()).abs() / exact_values[:rank].cpu()).max())
            ours = timed(lambda: sharded_svd(whole, rank, no_reduce, oversample=OVERSAMPLE,
                                             power_iters=POWER_ITERS), repeats, warmup=1)
            ours_part = timed(lambda: sharded_svd(sliced, rank, no_reduce, oversample=OVERSAMPLE,
                                                  power_iters=POWER_ITERS), repeats, warmup=1)
            lowrank = timed(lambda: torch.svd_lowrank(matrix, q=width, niter=POWER_ITERS), repeats, warmup=1)
            traffic = 4 * svd_traffic_elements(rows, cols, rank, OVERSAMPLE, POWER_ITERS)
            rows_out.append({"shape": [rows, cols], "projections": names, "rank": rank, "width": width,
                             "ours_s": ours, f"ours_one_rank_of_{WORLD}_s": ours_part, "exact_s": exact_s,
                             "svd_lowrank_s": lowrank, "max_rel_error": error, "traffic_bytes_per_rank": traffic,
                             "gathered_weight_bytes": 2 * rows * cols})
    return rows_out


def whole_model(spec: dict, rows: List[dict]) -> Dict[int, dict]:
    """Seconds for every target layer of the model at each rank (the per-shape rows × layers)."""
    totals: Dict[int, dict] = {}
    for row in rows:
        count = len(row["projections"]) * spec["layers"]
        total = totals.setdefault(row["rank"], {"layers": 0, "ours_s": 0.0, f"ours_one_rank_of_{WORLD}_s": 0.0,
                                                "exact_s": 0.0, "svd_lowrank_s": 0.0, "traffic_bytes_per_rank": 0,
                                                "gathered_weight_bytes": 0})
        total["layers"] += count
        for key in list(total):
            if key != "layers":
                total[key] += count * row[key]
    return totals


def markdown(record: dict) -> str:
    part = f"ours_one_rank_of_{WORLD}_s"
    lines = [f"# Sharded SVD at {record['model']}'s target shapes on {record['device']}", "",
             f"Command: `{record['command']}`; {record['machine']}; torch {record['torch']}; commit {record['commit']}; "
             f"{record['date']}. Oversampling {OVERSAMPLE}, {POWER_ITERS} power iterations (GoRAConfig's defaults); "
             f"svd_lowrank at the same width and iterations; float32 matrices with singular values ∝ 1/j.", "",
             f"| shape (projections) | rank | ours s | one rank of {WORLD} s | exact SVD s | svd_lowrank s | "
             "exact / ours | max rel. error σ | bytes sent / rank | bf16 weight bytes |", "|" + "---|" * 10]
    for row in record["rows"]:
        lines.append(f"| {row['shape'][0]}×{row['shape'][1]} ({', '.join(row['projections'])}) | {row['rank']} | "
                     f"{row['ours_s']:.4f} | {row[part]:.4f} | {row['exact_s']:.4f} | {row['svd_lowrank_s']:.4f} | "
                     f"{row['exact_s'] / row['ours_s']:.1f} | {row['max_rel_error']:.1e} | "
                     f"{row['traffic_bytes_per_rank'] / 1e6:.2f} MB | {row['gathered_weight_bytes'] / 1e6:.1f} MB |")
    lines += ["", "Every target layer of the model:", "",
              f"| rank | layers | ours s | one rank of {WORLD} s | exact SVD s | svd_lowrank s | bytes sent / rank | "
              "bf16 weights bytes |", "|" + "---|" * 8]
    for rank, total in record["whole_model"].items():
        lines.append(f"| {rank} | {total['layers']} | {total['ours_s']:.2f} | {total[part]:.2f} | {total['exact_s']:.2f} | "
                     f"{total['svd_lowrank_s']:.2f} | {total['traffic_bytes_per_rank'] / 1e6:.1f} MB | "
                     f"{total['gathered_weight_bytes'] / 1e9:.2f} GB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import platform

    import torch

    from provenance import git_commit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script, measures nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    options = parser.parse_args(argv)
    spec = SMALL if options.quick else LLAMA_1B
    rows = measure(spec, options.device, repeats=options.repeats)
    device = torch.cuda.get_device_name(0) if options.device.startswith("cuda") else "cpu"
    record = {"model": "a small Llama" if options.quick else "Llama-3.2-1B", "device": device, "rows": rows,
              "whole_model": whole_model(spec, rows), "torch": torch.__version__, "commit": git_commit(),
              "command": "python benchmarks/sharded_svd_speed.py" + (" --quick" if options.quick else ""),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    slug = "quick" if options.quick else "".join(c if c.isalnum() else "_" for c in device.lower())
    stem = os.path.join(options.results, f"sharded_svd_speed_{slug}")
    os.makedirs(options.results, exist_ok=True)
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    text = markdown(record)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    print(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
