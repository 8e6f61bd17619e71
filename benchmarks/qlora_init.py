#!/usr/bin/env python
"""GoRA's init on a 4-bit base (QLoRA) against the same model unquantised and against the QLoRA training
steps it precedes, and how close the 4-bit plan is to the plan of the model it was quantised from.

    python benchmarks/qlora_init.py            # SmolLM2-135M-Instruct (packaged), 8 gradient steps
    python benchmarks/qlora_init.py --quick    # 2 gradient steps, 2 training steps

Each row runs in its own process (MALLOC_MMAP_THRESHOLD_=131072, so freed buffers go back to the
system and the peak resident memory is the live memory's): the model loaded, the peak reset, then
``estimate_plan`` (local engine, GoRA's defaults on the 7 projections) on the same batches, or the same
number of LoRA training steps (PEFT r = 8 on the same layers, AdamW, one batch a step). Real text: the
movie-review snippets of the embedded job, in batches of 8 × 64 tokens. The 4-bit base is nf4 with
double quantisation (QLoRA's), computing in the dense rows' dtype (``--precision``: fp32 by default,
because this CPU has no bf16 matmul units: 2 gradient steps of the bf16 model took 266 s against
seconds in fp32); the packaged GGUF is dequantised and staged as safetensors before it is quantised
(the launcher's path). A tiny Llama under the same
imports gives the runtime's own resident memory. Results: benchmarks/results/qlora_init_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from init_overhead import peak_rss_mb, reset_peak_rss  # noqa: E402
from provenance import git_commit, git_dirty, package_versions  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LENGTH = 8, 64
ROWS = ("runtime", "gora_dense", "gora_nf4", "lora_steps_dense", "qlora_steps_nf4")


def current_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def batches(count: int):
    """``count`` batches of BATCH movie-review snippets as causal-LM inputs (padding masked out of the loss)."""
    import torch

    from gora_dist.launcher.tasks.classification import load_examples
    from gora_dist.launcher.tokenizer import load_tokenizer

    examples, _ = load_examples("movie-sentiment")
    tokenizer = load_tokenizer("smollm2")
    made = []
    for index in range(count):
        rows = [tokenizer.encode(text)[:LENGTH] for text, _ in examples[index * BATCH:(index + 1) * BATCH]]
        ids = torch.full((BATCH, LENGTH), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((BATCH, LENGTH), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        made.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return made


def load(kind: str, precision: str):
    import torch

    from gora_dist.launcher.models import load_model
    from gora_dist.launcher.quantization import bnb_config

    if kind == "tiny":
        from gora_dist.launcher.models import _tiny_model

        return _tiny_model("tiny-llama", {}, 64)
    if kind == "dense":
        return load_model("smollm2", precision=precision)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    return load_model("smollm2", precision=precision, quantization=bnb_config("nf4", "uint8", compute),
                      device=torch.device("cpu"))


def worker(row: str, steps: int, train_steps: int, out: str, precision: str) -> None:
    import torch

    from gora_dist import GoRAConfig, estimate_plan

    torch.manual_seed(0)
    data = batches(max(steps, train_steps))
    model = load({"runtime": "tiny", "gora_dense": "dense", "lora_steps_dense": "dense"}.get(row, "nf4"), precision)
    loaded_mb = current_rss_mb()
    reset_peak_rss()
    tensors = list(model.parameters()) + list(model.buffers())
    model_mb = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) / 2**20
    result = {"row": row, "loaded_rss_mb": loaded_mb, "model_mb": model_mb}
    if row.startswith("gora"):
        config = GoRAConfig(target_modules=TARGETS, grad_steps=steps)
        started = time.perf_counter()
        plan = estimate_plan(model, iter(data), config, engine="local")
        result["seconds"] = time.perf_counter() - started
        result["gradient_s"] = plan.report.timings["gradient_s"]
        torch.save({"rank_map": plan.rank_map, "lora_b": plan.lora_b,
                    "importance": {n: l.importance for n, l in plan.report.layers.items()}}, out + ".plan.pt")
    elif row != "runtime":
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        started = time.perf_counter()
        for batch in data[:train_steps]:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    with open(out, "w") as handle:
        json.dump(result, handle)


def agreement(dense: dict, nf4: dict) -> dict:
    """How the 4-bit plan compares with the dense plan of the model it was quantised from."""
    import torch

    names = list(dense["rank_map"])
    same = sum(dense["rank_map"][n] == nf4["rank_map"][n] for n in names)
    shift = [abs(dense["rank_map"][n] - nf4["rank_map"][n]) for n in names]
    cosines = [float(torch.nn.functional.cosine_similarity(dense["lora_b"][n].flatten(), nf4["lora_b"][n].flatten(), dim=0))
               for n in names if n in dense["lora_b"] and n in nf4["lora_b"] and dense["rank_map"][n] == nf4["rank_map"][n]]
    importance = torch.tensor([[dense["importance"][n], nf4["importance"][n]] for n in names], dtype=torch.float64)
    ranks = importance.argsort(dim=0).argsort(dim=0).double()
    spearman = float(torch.corrcoef(ranks.T)[0, 1])
    relative = ((importance[:, 1] - importance[:, 0]).abs() / importance[:, 0]).sort().values
    cosines.sort()
    return {"layers": len(names), "same_rank": same, "mean_abs_rank_shift": sum(shift) / len(names),
            "max_abs_rank_shift": max(shift), "importance_spearman": spearman,
            "importance_rel_diff_median": float(relative[len(relative) // 2]), "importance_rel_diff_max": float(relative[-1]),
            "b0_cosine_min": cosines[0] if cosines else None, "b0_cosine_median": cosines[len(cosines) // 2] if cosines else None,
            "b0_layers_compared": len(cosines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", choices=ROWS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--result")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.train_steps, args.result, args.precision)
        return
    steps, train_steps = (2, 2) if args.quick else (args.steps, args.train_steps)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONUNBUFFERED="1")
    rows = {}
    for row in ROWS:
        result = os.path.join(args.out, f".qlora_{row}.json")
        command = [sys.executable, __file__, "--worker", row, "--steps", str(steps), "--train-steps", str(train_steps),
                   "--result", result, "--precision", args.precision]
        subprocess.run(command, env=env, check=True)
        rows[row] = json.load(open(result))
        os.remove(result)
        print(row, rows[row], flush=True)
    plans = {row: __import__("torch").load(os.path.join(args.out, f".qlora_{row}.json.plan.pt")) for row in ("gora_dense", "gora_nf4")}
    for row in plans:
        os.remove(os.path.join(args.out, f".qlora_{row}.json.plan.pt"))
    close = agreement(plans["gora_dense"], plans["gora_nf4"])
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "dirty": git_dirty("gora_dist", "benchmarks/qlora_init.py"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "versions": package_versions("torch", "transformers", "peft", "bitsandbytes"),
            "grad_steps": steps, "train_steps": train_steps, "precision": args.precision, "batch": [BATCH, LENGTH], "quick": args.quick}
    name = "qlora_init_cpu" + ("_quick" if args.quick else "")
    with open(os.path.join(args.out, name + ".json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows, "agreement": close}, handle, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as handle:
        handle.write(report(meta, rows, close))
    print(report(meta, rows, close))


def report(meta: dict, rows: dict, close: dict) -> str:
    runtime = rows["runtime"]["peak_rss_mb"]
    lines = ["# GoRA's init on a 4-bit base (SmolLM2-135M-Instruct, CPU)", "",
             f"{meta['date']}, commit {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}, "
             f"{meta['cpus']} CPUs, {meta['versions']}; {meta['grad_steps']} gradient steps / {meta['train_steps']} "
             f"training steps of {meta['batch'][0]} × {meta['batch'][1]} tokens, dense rows and nf4 compute in "
             f"{meta['precision']}. `python benchmarks/qlora_init.py{' --quick' if meta['quick'] else ''}"
             f"{' --precision bf16' if meta['precision'] == 'bf16' else ''}`.", "",
             "| row | model's tensors (MB) | RSS loaded (MB) | peak RSS after (MB) | peak − loaded: the phase (MB) | seconds |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        value = rows[row]
        seconds = f"{value['seconds']:.1f}" if "seconds" in value else "-"
        lines.append(f"| {row} | {value['model_mb']:.0f} | {value['loaded_rss_mb']:.0f} | {value['peak_rss_mb']:.0f} | "
                     f"{value['peak_rss_mb'] - value['loaded_rss_mb']:.0f} | {seconds} |")
    lines += ["", f"The runtime row is a tiny Llama under the same imports: the process itself holds {runtime:.0f} MB. "
              "The nf4 rows' loaded RSS holds more than their tensors: the GGUF file and the staged safetensors "
              "were read through memory maps on the way (the launcher's path for the packaged model).", "",
              f"4-bit plan against the {meta['precision']} plan of the model it was quantised from:", "",
              f"- ranks: {close['same_rank']} of {close['layers']} layers equal; mean |Δrank| {close['mean_abs_rank_shift']:.2f}, "
              f"max {close['max_abs_rank_shift']}",
              f"- importances: Spearman {close['importance_spearman']:.4f}; relative difference median "
              f"{close['importance_rel_diff_median']:.3%}, max {close['importance_rel_diff_max']:.3%}",
              f"- B0 cosine over the {close['b0_layers_compared']} layers of equal rank: median {close['b0_cosine_median']:.4f}, "
              f"min {close['b0_cosine_min']:.4f}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
