#!/usr/bin/env python
"""GoRA init communication and memory on clusters we cannot run here, from the same formulas that
predict the measured small runs exactly (bytes) or within 10 % (memory per phase).

    python benchmarks/cluster_model.py     # checks the formulas against benchmarks/results/init_overhead_cpu.json
                                           # and memory_cpu.json, then writes benchmarks/results/cluster_model.md

Assumptions (stated, not measured): bf16 gradients in the centralised scheme (as the official
code), float32 for ours; ring all-reduce moves 2(k−1)/k of the payload per rank, a pipelined
broadcast about the payload once; bandwidth per GPU 450 GB/s within an 8-GPU NVLink node and
50 GB/s (400 Gb/s InfiniBand) across nodes, the slower one governing k > 8; every layer at rank 8.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gora_dist.method.comm_model import gora_collective_bytes  # noqa: E402

MODELS = {  # hidden, intermediate, layers, kv width
    "Llama-3.1-8B": (4096, 14336, 32, 1024),
    "Llama-3.1-70B": (8192, 28672, 80, 1024),
}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def target_shapes(hidden: int, intermediate: int, layers: int, kv: int, projections=PROJECTIONS) -> dict:
    one = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
           "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    return {f"{layer}.{p}": one[p] for layer in range(layers) for p in projections}


def centralised_bytes(shapes: dict, world: int, steps: int, element_size: int) -> int:
    """Per rank: every target gradient all-reduced in full each step, then each layer broadcast once."""
    if world <= 1:
        return 0
    numel = sum(out * inp for out, inp in shapes.values())
    return numel * element_size * (steps + 1)


def llama_shapes_from_row(row: dict) -> dict:
    sizes = {"tiny": (64, 172, 2, 32), "small": (256, 688, 4, 128), "base": (512, 1376, 8, 256)}
    return target_shapes(*sizes[row["size"]])


def check_against_measured(path: str) -> list:
    with open(path) as handle:
        data = json.load(handle)
    steps, checked = data["meta"]["grad_steps"], []
    for row in data["rows"]:
        shapes = llama_shapes_from_row(row)
        assert sum(a * b for a, b in shapes.values()) == row["target_elements"], row["size"]
        central = centralised_bytes(shapes, row["world"], steps, element_size=4)  # the benchmark runs float32
        assert central == row["centralised"]["bytes"], (row["size"], row["world"], central, row["centralised"]["bytes"])
        checked.append((row["size"], row["world"], row["ours"]["bytes"], central))
    return checked


def seconds(payload: float, world: int, all_reduce: bool) -> float:
    bandwidth = 450e9 if world <= 8 else 50e9
    factor = 2 * (world - 1) / world if all_reduce else 1.0
    return payload * factor / bandwidth


def table(steps: int = 8) -> str:
    lines = ["| model (q k v o gate up down) | GPUs | ours: bytes/rank | ours: comm time | ours: fp32 sums/rank | "
             "central: bytes/rank | central: comm time | central: rank-0 CPU | central: full model per GPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, dims in MODELS.items():
        shapes = target_shapes(*dims)
        numel = sum(out * inp for out, inp in shapes.values())
        ranks = {layer: 8 for layer in shapes}
        for world in (8, 64, 256):
            ours = gora_collective_bytes(shapes, ranks, world_size=world, steps=steps)
            central = centralised_bytes(shapes, world, steps, element_size=2)
            ours_time = seconds(ours, world, all_reduce=True)
            central_time = seconds(numel * 2 * steps, world, True) + seconds(numel * 2, world, False)
            lines.append(
                f"| {name} | {world} | {ours / 1e6:.1f} MB | {ours_time * 1e3:.1f} ms | {numel * 4 / world / 1e9:.2f} GB | "
                f"{central / 1e9:.1f} GB | {central_time:.2f} s | {numel * 2 / 1e9:.1f} GB | yes |")
    return "\n".join(lines)


MEMORY_PHASES = ("load", "gradient steps", "init", "training")


def rank_memory(model_bytes: float, block_bytes: float, target_elements: float, adapter_elements: float,
                world: int, engine: str, working_blocks: dict) -> dict:
    """Model-dependent bytes the largest rank holds at the peak of each phase, by the launcher's flow:
    its shard of the weights (model/world), plus a working set of ``working_blocks[phase]`` blocks
    (gathered weights, their all-gather buffers, the prefetched next block, a layer's gradient in
    flight); in the gradient steps and init GoRA's float32 sums of 1/world of the targets (both
    engines reduce-scatter each gradient inside the backward and keep no gradient of their own); in
    training the adapters' float32 weights, gradients and two AdamW moments (replicated under FSDP2,
    partitioned under ZeRO-3)."""
    shard = model_bytes / world
    sums = 4 * target_elements / world
    adapters = 16 * adapter_elements / (world if engine == "zero3" else 1)
    extra = {"load": 0.0, "gradient steps": sums, "init": sums, "training": adapters}
    return {phase: shard + extra[phase] + working_blocks[phase] * block_bytes for phase in MEMORY_PHASES}


def lora_elements(shapes: dict, rank: int = 8) -> int:
    """Adapter parameters of LoRA at one rank on every target (GoRA's budget equals it)."""
    return sum(rank * (out + inp) for out, inp in shapes.values())


def _measured(path: str):
    with open(path) as handle:
        data = json.load(handle)
    sizes, shape = data["sizes"], data["sizes"]["shape"]
    kv = shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = target_shapes(shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], kv)
    return data, sizes, lora_elements(shapes)


def calibrate_working_blocks(path: str, world: int = 2) -> dict:
    """{engine: {phase: blocks}}: the working set that makes rank_memory equal the heap measured at
    ``world`` (what is left of the peak after the shard, the sums and the adapters)."""
    data, sizes, adapters = _measured(path)
    zero = dict.fromkeys(MEMORY_PHASES, 0.0)
    working = {}
    for run in data["runs"]:
        if run["world"] != world:
            continue
        base = rank_memory(sizes["model_bytes"], sizes["block_bytes"], sizes["target_bytes"] / 4, adapters, world,
                           run["engine"], zero)
        working[run["engine"]] = {phase: (run["phases"][phase]["model_dependent_heap"] - base[phase]) / sizes["block_bytes"]
                                  for phase in MEMORY_PHASES}
    return working


def check_memory_against_measured(path: str, working: dict, calibrated_at: int = 2) -> list:
    """(engine, world, phase, measured, predicted) for the runs at world sizes above ``calibrated_at``:
    predictions out of the calibration sample."""
    data, sizes, adapters = _measured(path)
    rows = []
    for run in data["runs"]:
        if run["world"] <= calibrated_at:
            continue
        predicted = rank_memory(sizes["model_bytes"], sizes["block_bytes"], sizes["target_bytes"] / 4, adapters,
                                run["world"], run["engine"], working[run["engine"]])
        rows += [(run["engine"], run["world"], phase, run["phases"][phase]["model_dependent_heap"], predicted[phase])
                 for phase in MEMORY_PHASES]
    return rows


def memory_table(working: dict, worlds=(8, 64)) -> str:
    lines = ["| model (bf16, q k v o gate up down) | GPUs | engine | load | gradient steps | init | training |",
             "|---|---|---|---|---|---|---|"]
    for name, (hidden, intermediate, layers, kv) in MODELS.items():
        shapes = target_shapes(hidden, intermediate, layers, kv)
        targets = sum(out * inp for out, inp in shapes.values())
        block = sum(out * inp for key, (out, inp) in shapes.items() if key.startswith("0.")) + 2 * hidden
        parameters = targets + 2 * 128256 * hidden + layers * 2 * hidden + hidden  # untied embeddings and head
        for world in worlds:
            for engine in ("fsdp2", "zero3"):
                memory = rank_memory(2 * parameters, 2 * block, targets, lora_elements(shapes), world, engine,
                                     working[engine])
                lines.append(f"| {name} | {world} | {engine} | " + " | ".join(f"{memory[p] / 1e9:.1f} GB" for p in MEMORY_PHASES) + " |")
    return "\n".join(lines)


def main() -> None:
    measured = os.path.join(ROOT, "benchmarks", "results", "init_overhead_cpu.json")
    checked = check_against_measured(measured)
    text = (
        "# Cluster model of GoRA init (computed, not measured)\n\n"
        f"{__doc__.split('Assumptions')[1].strip().replace(chr(10), ' ')}\n\n"
        f"Formulas checked against the measured CPU runs first: the centralised byte count matched all "
        f"{len(checked)} rows exactly; ours is checked the same way in tests/test_distributed.py.\n"
        "N = 8 gradient steps. Ours also has the engine's own gradient reduction, which is that of N training "
        "steps with the target weights trainable; the centralised scheme adds its all-reduce on top of the "
        "engine's.\n\n" + table() + "\n"
    )
    memory_file = os.path.join(ROOT, "benchmarks", "results", "memory_cpu.json")
    if os.path.exists(memory_file):
        working = calibrate_working_blocks(memory_file)
        rows = check_memory_against_measured(memory_file, working)
        worst = max(abs(measured - predicted) / measured for *_, measured, predicted in rows)
        text += ("\n## Memory per rank\n\n"
                 "`rank_memory`: the shard of the weights, GoRA's sums in the gradient steps and init, the adapters' "
                 "state, and a working set of whole blocks (gathered weights and their "
                 "buffers, the prefetched block, a layer's gradient in flight) that does not depend on the world size. The "
                 "working set is calibrated on the world-2 runs of benchmarks/memory.py (heap, largest rank, "
                 "model-dependent), in blocks: " + "; ".join(
                     f"{engine} " + ", ".join(f"{phase} {value:.1f}" for phase, value in phases.items())
                     for engine, phases in working.items()) + ". "
                 f"Predicted for the world-4 runs it is off by at most {100 * worst:.1f} % of the measured peak:\n\n"
                 "| engine | world | phase | measured | predicted | deviation |\n|---|---|---|---|---|---|\n")
        for engine, world, phase, measured, predicted in rows:
            text += (f"| {engine} | {world} | {phase} | {measured / 2**30:.3f} GiB | {predicted / 2**30:.3f} GiB | "
                     f"{100 * (predicted - measured) / measured:+.1f} % |\n")
        text += ("\nThe same formula for Llama-3.1 in bf16 (weights and gathered blocks in bf16; "
                 "GoRA's sums and the adapters' state in float32; the budget of LoRA r = 8 on all seven projections; "
                 "the working set in blocks as calibrated above; activations, the CUDA context and allocator slack "
                 "not included):\n\n" + memory_table(working) + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "cluster_model.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
