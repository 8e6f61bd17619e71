#!/usr/bin/env python
"""Bytes on a real wire during GoRA's init across 2 and 4 "nodes" (Linux network namespaces on one
bridge, tests/netns.py), against the communication model.

    sudo python benchmarks/multinode_wire.py        # root: it makes namespaces; about 2 minutes on 2 cores

Each cell is ``launch/train.py --init-only --engine fsdp2`` (tiny Llama, global batch 8) under
``torchrun --nnodes K --nproc_per_node 1`` with one namespace per node, gloo over its eth0, at N = 4
and N = 8 gradient steps. Counted: every node's eth0 tx/rx bytes (kernel counters, headers
included) from before the launchers start to after they exit. Modelled, per rank (bytes it sends):

- GoRA's own collectives: ``gora_collective_bytes`` (payload; also read back from the run's gora.json);
- FSDP2's traffic during the N estimation steps, assuming ring-optimal gloo collectives ((k-1)/k of
  the full float32 payload sent per rank): per step an all-gather of every parameter in the forward,
  a second one of the blocks' parameters in the backward (the root stays unsharded after its
  forward), and a reduce-scatter of the target gradients (only targets require grad).

The slope between N = 4 and N = 8 isolates the per-step traffic from start-up (rendezvous, the
gloo connection mesh, TCP handshakes), which the model does not describe. Writes
benchmarks/results/multinode_wire.{json,md} with commit, date and versions.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file
sys.path.insert(0, os.path.join(ROOT, "tests"))

from netns import Cluster, netns_unavailable  # noqa: E402
from conftest import write_reviews  # noqa: E402
from netns_launch import run_job  # noqa: E402

from gora_dist.method.comm_model import gora_collective_bytes  # noqa: E402
from provenance import git_commit, git_dirty  # noqa: E402

NODES, STEPS = (2, 4), (4, 8)
OUT = os.path.join(ROOT, "benchmarks", "results")


def model_sizes() -> dict:
    """Parameter counts of the launcher's tiny-llama: all, outside the blocks (FSDP2's root), targets."""
    from gora_dist.launcher.targets import LLAMA_TARGETS
    from gora_dist.launcher.models import load_model

    model = load_model("tiny-llama")
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    targets = sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    return {"all": total, "blocks": blocks, "root": total - blocks, "targets": targets}


def fsdp2_step_bytes(sizes: dict, nodes: int) -> dict:
    share = (nodes - 1) / nodes
    return {"forward_all_gather": share * 4 * sizes["all"], "backward_all_gather": share * 4 * sizes["blocks"],
            "gradient_reduce_scatter": share * 4 * sizes["targets"]}


def run_cell(nodes: int, steps: int, data: str, work: str) -> dict:
    out = os.path.join(work, f"k{nodes}-n{steps}")
    args = ["--model", "tiny-llama", "--data", data, "--output-dir", out, "--train-examples", "300",
            "--eval-examples", "32", "--gora.grad_steps", str(steps), "--engine", "fsdp2", "--init-only"]
    with Cluster(nodes, os.path.join(work, f"logs-k{nodes}-n{steps}")) as cluster:
        before = [cluster.counters(n) for n in range(nodes)]
        job = run_job(cluster, "torchrun", args, timeout=300)
        after = [cluster.counters(n) for n in range(nodes)]
    with open(os.path.join(out, "init", "gora.json")) as handle:
        gora = json.load(handle)
    shapes = {name: tuple(layer["shape"]) for name, layer in gora["layers"].items()}
    predicted = gora_collective_bytes(shapes, gora["rank_map"], world_size=nodes, steps=gora["grad_steps"])
    return {"nodes": nodes, "grad_steps": steps, "wall_s": max(job.ended.values()) - job.started,
            "tx_per_node": [a["tx"] - b["tx"] for a, b in zip(after, before)],
            "rx_per_node": [a["rx"] - b["rx"] for a, b in zip(after, before)],
            "gora_payload_counted": gora["timings"]["bytes_communicated"], "gora_payload_model": predicted}


def mean(values) -> float:
    return sum(values) / len(values)


def main() -> None:
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"cannot make network namespaces here: {reason}")
    sizes = model_sizes()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = write_reviews(os.path.join(work, "reviews.jsonl"))
        for nodes in NODES:
            for steps in STEPS:
                rows.append(run_cell(nodes, steps, data, work))
                print(json.dumps(rows[-1]))
    analysis = []
    for nodes in NODES:
        low, high = [r for r in rows if r["nodes"] == nodes]
        engine = fsdp2_step_bytes(sizes, nodes)
        slope = (mean(high["tx_per_node"]) - mean(low["tx_per_node"])) / (high["grad_steps"] - low["grad_steps"])
        gora_slope = (high["gora_payload_model"] - low["gora_payload_model"]) / (high["grad_steps"] - low["grad_steps"])
        modelled_step = sum(engine.values()) + gora_slope
        for row in (low, high):
            row["model_total_per_node"] = row["gora_payload_model"] + row["grad_steps"] * sum(engine.values())
            row["start_up_per_node"] = mean(row["tx_per_node"]) - row["grad_steps"] * slope
        analysis.append({"nodes": nodes, "measured_step_bytes_per_node": slope, "model_step_bytes_per_node": modelled_step,
                         "model_step_parts": {**engine, "gora_flags": gora_slope},
                         "measured_over_model": slope / modelled_step})
    commit = git_commit(short=False)
    dirty = git_dirty("gora_dist", "launch", "tests/netns.py", "tests/netns_launch.py", "benchmarks/multinode_wire.py")
    import torch

    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    meta = {"commit": commit, "tree_dirty": dirty, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": ds_version,
            "kernel": platform.release(), "cpus": os.cpu_count(), "model": "tiny-llama", "sizes": sizes,
            "global_batch": 8, "engine": "fsdp2", "launcher": "torchrun static rendezvous, 1 process per node"}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "multinode_wire.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows, "analysis": analysis}, handle, indent=2)
    with open(os.path.join(OUT, "multinode_wire.md"), "w") as handle:
        handle.write(render(meta, rows, analysis))
    print(render(meta, rows, analysis))


def render(meta: dict, rows: list, analysis: list) -> str:
    def kb(value: float) -> str:
        return f"{value / 1e3:,.1f} kB"

    lines = [
        "# Bytes on the wire: GoRA init across network-namespace nodes (`benchmarks/multinode_wire.py`)", "",
        (f"commit {meta['commit'][:12]}{' (+ uncommitted changes)' if meta['tree_dirty'] else ''}, {meta['date']}; "
         f"torch {meta['torch']}, deepspeed {meta['deepspeed']}, Python {meta['python']}, Linux {meta['kernel']}, "
         f"{meta['cpus']} CPUs. `--init-only --engine fsdp2`, tiny Llama ({meta['sizes']['all']:,} parameters, "
         f"{meta['sizes']['targets']:,} in the 14 target weights), global batch 8, one process per node, gloo."), "",
        "| nodes | N | tx per node (measured) | GoRA payload per rank: model / counted | model: GoRA + FSDP2 steps | start-up (measured − N × slope) | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['nodes']} | {row['grad_steps']} | {kb(mean(row['tx_per_node']))} | "
                     f"{row['gora_payload_model']:,} B / {row['gora_payload_counted']:,.0f} B | "
                     f"{kb(row['model_total_per_node'])} | {kb(row['start_up_per_node'])} | {row['wall_s']:.1f} s |")
    lines += ["", "| nodes | per estimation step, per node: measured (slope N=4→8) | modelled (FSDP2 all-gathers + reduce-scatter + GoRA flags) | measured / model |",
              "|---|---|---|---|"]
    for entry in analysis:
        lines.append(f"| {entry['nodes']} | {kb(entry['measured_step_bytes_per_node'])} | "
                     f"{kb(entry['model_step_bytes_per_node'])} | {entry['measured_over_model']:.2f} |")
    lines += ["", ("GoRA's own payload is a few tens of kB per rank; the wire carries FSDP2's per-step all-gathers "
                   "and reduce-scatters (modelled as ring-optimal, float32) plus start-up traffic and TCP/IP headers "
                   "and ACKs, which the model does not include."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
