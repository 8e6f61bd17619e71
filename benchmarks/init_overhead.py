#!/usr/bin/env python
"""GoRA init overhead, side by side in one run: our sharded scheme, the official code's centralised
scheme (reimplemented here), and N plain training steps of the same model as the unit of cost.

    python benchmarks/init_overhead.py                 # world sizes 1 2 4, three model sizes (CPU, gloo)
    python benchmarks/init_overhead.py --quick         # world sizes 1 2, tiny model only
    torchrun --nproc_per_node K benchmarks/init_overhead.py --worker SIZE OUT.json   # one cell

Per cell and scheme: seconds of the N gradient steps, seconds of everything after them, payload
bytes handed to collectives by GoRA itself (ours: counted by ``Collective``; centralised: counted
here), float32/gradient elements held per rank for the statistics, and peak RSS per rank. Results go
to benchmarks/results/init_overhead_<device>.{json,md} with machine, versions, commit and date.

The centralised baseline follows gora-spec.md's reading of the official code: every rank holds the
whole model; after each backward every target gradient is all-reduced in full (a hook per
parameter), rank 0 keeps the running sums on its CPU, and after N steps rank 0 broadcasts each
layer's full mean gradient to every rank, which then computes importance and B0 locally. Here it
runs in float32 (gloo on the CPU); the official code sums in bf16, which would halve its bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file

from provenance import git_commit, package_versions  # noqa: E402

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads)
    "tiny": (64, 172, 2, 4, 2),
    "small": (256, 688, 4, 8, 4),
    "base": (512, 1376, 8, 8, 4),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLOBAL_BATCH, LENGTH, STEPS, VOCAB = 8, 64, 4, 1000


def build_model(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def rank_batches(rank: int, world: int, steps: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    per = GLOBAL_BATCH // world
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)[rank * per:(rank + 1) * per]
        yield {"input_ids": ids, "labels": ids.clone()}


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux: 5 > /proc/self/clear_refs), so each
    scheme's peak is its own; False where the kernel does not allow it (then peaks accumulate)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(size: str, rank: int, world: int) -> dict:
    from gora_dist import GoRAConfig
    from gora_dist import estimate_plan

    model = build_model(size)
    config = GoRAConfig(target_modules=TARGETS, grad_steps=STEPS)
    plan = estimate_plan(model, rank_batches(rank, world, STEPS, seed=1), config,
                         engine="local" if world == 1 else "fsdp2")
    return {"gradient_s": plan.report.timings["gradient_s"], "after_s": plan.report.timings["init_s"],
            "bytes": plan.report.timings["bytes_communicated"], "held_elements": plan.report.accumulator_elements,
            "rank_map": plan.rank_map, "plan": plan}


def centralised(size: str, rank: int, world: int) -> dict:
    """The official scheme: full model everywhere, per-parameter all-reduce, rank-0 CPU sums, broadcast."""
    import torch
    import torch.distributed as dist

    from gora_dist.model.targets import find_target_modules
    from gora_dist.method.initialization import gora_init_b, kaiming_uniform_a, rslora_scaling
    from gora_dist.method.importance import layer_importance

    model = build_model(size)
    targets = find_target_modules(model, TARGETS)
    for param in model.parameters():
        param.requires_grad_(False)
    sums, sent = {}, [0]

    def hook(name):
        def reduce(param):
            grad = param.grad
            if world > 1:
                dist.all_reduce(grad)
                grad /= world
                sent[0] += grad.numel() * grad.element_size()
            if rank == 0:
                sums[name] = sums.get(name, 0) + grad.detach().to("cpu", copy=True)
            param.grad = None
        return reduce

    handles = []
    for name, module in targets.items():
        module.weight.requires_grad_(True)
        handles.append(module.weight.register_post_accumulate_grad_hook(hook(name)))
    start = time.perf_counter()
    for batch in rank_batches(rank, world, STEPS, seed=1):
        model(**batch).loss.backward()
    gradient_s = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    held = sum(t.numel() for t in sums.values())
    start = time.perf_counter()
    for name, module in targets.items():  # rank 0 broadcasts each layer's full mean gradient
        mean = sums[name] / STEPS if rank == 0 else torch.empty_like(module.weight)
        if world > 1:
            dist.broadcast(mean, src=0)
            sent[0] += mean.numel() * mean.element_size()
        layer_importance("mean_abs_wg", module.weight, mean)
        lora_a = kaiming_uniform_a(8, module.in_features, seed=0, module_name=name)
        gora_init_b(mean, lora_a, gamma=0.05, scaling=rslora_scaling(16.0, 8))
    return {"gradient_s": gradient_s, "after_s": time.perf_counter() - start, "bytes": float(sent[0]),
            "held_elements": held}


def training_steps(size: str, rank: int, world: int, plan) -> dict:
    """N ordinary training steps of the adapted model under the same engine: the unit of cost."""
    import torch

    from gora_dist.pipeline.apply import apply_plan

    model = build_model(size)
    apply_plan(model, plan)
    runner = model
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for batch in rank_batches(rank, world, STEPS, seed=2):
        runner(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"train_s": time.perf_counter() - start}


def slowest(value: float) -> float:
    """The largest of ``value`` over the ranks (a MAX all-reduce); itself in one process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def worker(size: str, out: str, scheme: str) -> None:
    """One process per rank and scheme ("ours" then N training steps, or "centralised"), so each
    scheme's peak RSS is its own: a process rarely hands freed memory back to the system."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    warm = build_model(size)  # first backward of a process pays thread-pool and allocator start-up
    for batch in rank_batches(rank, world, 1, seed=3):
        warm(**batch).loss.backward()
    row = {"size": size, "world": world, "params": sum(p.numel() for p in warm.parameters())}
    del warm
    gc.collect()
    row["peak_reset"] = reset_peak_rss()  # the warm-up's own peak does not count
    if scheme == "ours":
        mine = ours(size, rank, world)
        plan = mine.pop("plan")
        row["target_elements"] = sum(l.shape[0] * l.shape[1] for l in plan.report.layers.values())
        row["ours"] = {k: slowest(v) if k.endswith("_s") else v for k, v in mine.items() if k != "rank_map"}
        row["ours"]["peak_rss_mb"] = slowest(peak_rss_mb())
        row["unit"] = {k: slowest(v) for k, v in training_steps(size, rank, world, plan).items()}
    else:
        row["centralised"] = {k: slowest(v) if k.endswith("_s") else v for k, v in centralised(size, rank, world).items()}
        row["centralised"]["peak_rss_mb"] = slowest(peak_rss_mb())
        row["centralised"]["held_elements_rank0"] = row["centralised"].pop("held_elements") if rank == 0 else None
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(row, handle)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see launch/train.py: gloo can abort in interpreter finalisation


def drive(worlds, sizes, results_dir: str) -> None:
    rows = []
    for size in sizes:
        for world in worlds:
            row = {}
            for scheme in ("ours", "centralised"):
                out = os.path.join(results_dir, f".cell-{size}-{world}-{scheme}.json")
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                           os.path.abspath(__file__), "--worker", size, out, "--scheme", scheme]
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
                subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
                with open(out) as handle:
                    row.update(json.load(handle))
                os.remove(out)
            rows.append(row)
            print(f"{size} world {world}: done", flush=True)
    commit = git_commit()
    meta = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU, gloo",
            "versions": package_versions("torch", "transformers", "deepspeed"), "commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "grad_steps": STEPS, "global_batch": GLOBAL_BATCH, "length": LENGTH}
    with open(os.path.join(results_dir, "init_overhead_cpu.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    with open(os.path.join(results_dir, "init_overhead_cpu.md"), "w") as handle:
        handle.write(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list) -> str:
    lines = [
        f"# GoRA init overhead on the CPU ({meta['date']}, commit {meta['commit']})", "",
        f"{meta['machine']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; "
        f"N = {meta['grad_steps']} gradient steps of a global batch of {meta['global_batch']} × {meta['length']} tokens; "
        "times and peak RSS are the slowest / largest rank's (peak RSS: the process's resident high-water mark "
        "of a process running that scheme alone, after its warm-up, torch runtime included), after one warm-up backward per "
        "process; world 4 runs 4 processes on "
        f"{os.cpu_count()} cores, so its times are inflated by oversubscription. "
        "Command: `python benchmarks/init_overhead.py`.", "",
        "| model | params | world | ours: N grad steps s | ours: after s | after / grad | ours: bytes/rank | ours: fp32 sums/rank (share) | ours: peak RSS/rank | central: N grad steps s | central: after s | central: bytes/rank | central: peak RSS/rank | N train steps s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, central, unit = row["ours"], row["centralised"], row["unit"]
        share = ours["held_elements"] / row["target_elements"]
        lines.append(
            f"| {row['size']} | {row['params'] / 1e6:.1f} M | {row['world']} | {ours['gradient_s']:.2f} | {ours['after_s']:.3f} | "
            f"{ours['after_s'] / ours['gradient_s']:.1%} | {ours['bytes'] / 1e6:.3f} MB | {ours['held_elements']:,} ({share:.2f}) | "
            f"{ours['peak_rss_mb']:.0f} MB | {central['gradient_s']:.2f} | {central['after_s']:.3f} | "
            f"{central['bytes'] / 1e6:.2f} MB | {central['peak_rss_mb']:.0f} MB | {unit['train_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "OUT"))
    parser.add_argument("--scheme", choices=("ours", "centralised"), default="ours")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    options = parser.parse_args()
    if options.worker:
        worker(*options.worker, options.scheme)
        return
    os.makedirs(options.results, exist_ok=True)
    if options.quick:
        drive([1, 2], ["tiny"], options.results)
    else:
        drive([1, 2, 4], list(SIZES), options.results)


if __name__ == "__main__":
    main()
