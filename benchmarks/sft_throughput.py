#!/usr/bin/env python
"""SFT training throughput, side by side in one run: the launcher padded or padding-free, with
logits at targets or full logits, against TRL's SFTTrainer + PEFT LoRA unpacked, padding-free and
packed; the same model folder, data file, batch, max_length and LoRA budget (r = 8 on all 7
projections; GoRA's ranks spend the same budget).

    python benchmarks/sft_throughput.py                    # ASDiv, then few-shot ASDiv (long-tailed lengths)
    python benchmarks/sft_throughput.py --datasets asdiv --steps 8

The model is the packaged SmolLM2-135M-Instruct as a plain fp32 folder (benchmarks/trl_sft.py makes
it); the data are ASDiv's problems as prompt/completion JSONL, and the same problems each preceded
by k solved others (k long-tailed: 0 for half of them, up to 6), which makes the lengths long-tailed.
Every configuration runs in its own process, in turn, on 2 CPU cores with nothing else running;
steps after the first ``--warmup`` are measured: seconds a step, and per second the positions
computed (padding included), the real tokens (not padding) and the trained tokens (those with a
label), and the process's peak resident memory (``ru_maxrss``: an upper bound, glibc keeps freed
buffers; ours at the last step, GoRA's estimation and the first evaluation included; TRL's after
training). MALLOC_MMAP_THRESHOLD_ is left alone: a low one (every large buffer its own mmap) made
the steps about 1.5x slower here, mostly in the kernel. GoRA's estimation and the evaluations are outside the
measured steps. Then the launcher padded and padding-free for ``--curve-steps`` steps on ASDiv: the
two loss curves, compared step by step. Results: benchmarks/results/sft_throughput_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import git_commit, git_dirty, package_versions  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OURS = {"ours padded": ["--padding-free", "false"],
        "ours padded, full logits": ["--padding-free", "false", "--logits-at-targets", "false"],
        "ours padding-free": ["--padding-free", "true"],
        "ours padding-free, full logits": ["--padding-free", "true", "--logits-at-targets", "false"]}
TRL = {"TRL unpacked": {}, "TRL padding_free": {"padding_free": True}, "TRL packing": {"packing": True}}
MAX_LENGTH = {"asdiv": 128, "asdiv-few-shot": 1024}
"""Longer than every example of the set (ASDiv's longest is 106 tokens; 7 of them fit in 1,024): nothing is cut."""


def write_data(work: str) -> dict:
    """{name: prompt/completion JSONL}: ASDiv, and ASDiv with k solved problems before each prompt."""
    from gora_dist.launcher.tasks.sft_data import asdiv_records

    records = [record for _, record in asdiv_records()]
    rng = random.Random(0)
    few_shot = []
    for record in records:
        k = min(6, int(rng.expovariate(0.7)))
        shots = "".join(f"{r['prompt']}{r['completion']}\n\n" for r in rng.sample(records, k))
        few_shot.append({"prompt": shots + record["prompt"], "completion": record["completion"]})
    files = {}
    for name, rows in (("asdiv", records), ("asdiv-few-shot", few_shot)):
        files[name] = os.path.join(work, f"{name}.jsonl")
        with open(files[name], "w") as handle:
            handle.writelines(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows)
    return files


def run_ours(flags: list, model: str, data: str, max_length: int, steps: int, out: str) -> list:
    command = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model", model, "--task", "sft", "--data",
               data, "--output-dir", out, "--overwrite", "--steps", str(steps), "--global-batch-size", "8",
               "--max-length", str(max_length), "--skip-long", "--gora.grad_steps", "1", "--eval-examples", "8",
               "--max-new-tokens", "1", "--show-generations", "0", "--checkpoint-every", "0", "--lr", "2e-4", *flags]
    subprocess.run(command, check=True, capture_output=True, text=True, env=worker_environment())
    from gora_dist.launcher.step_log import read_log

    return [{key: line[key] for key in ("step_s", "tokens", "real_tokens", "trained_tokens", "loss", "peak_memory_gb")}
            for line in read_log(out, "step")]


def worker_environment() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def trl_worker(spec: dict) -> list:
    """In this process: TRL's SFTTrainer + PEFT LoRA for ``spec['steps']`` steps; per step its seconds
    and the counts of the batch it trained on."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows, pending = [], {}

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask")
            pending["tokens"] = pending.get("tokens", 0) + ids.numel()
            pending["real_tokens"] = pending.get("real_tokens", 0) + int(mask.sum() if mask is not None else ids.numel())
            pending["trained_tokens"] = pending.get("trained_tokens", 0) + int((labels[..., 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            pending.clear()
            pending["started"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rows.append({"step_s": time.perf_counter() - pending.pop("started"), **pending})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and rows:
                rows[-1]["loss"] = float(logs["loss"])

    torch.manual_seed(0)
    train = datasets.load_dataset("json", data_files=spec["data"], split="train")
    # TRL refuses max_length with padding_free unpacked (it would not enforce it); nothing here is longer
    max_length = None if spec["options"].get("padding_free") else spec["max_length"]
    config = SFTConfig(output_dir=spec["out"], per_device_train_batch_size=8, gradient_accumulation_steps=1,
                       max_steps=spec["steps"], learning_rate=2e-4, max_length=max_length, logging_steps=1,
                       report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=0, **spec["options"])
    trainer = Counting(model=spec["model"], args=config, train_dataset=train, callbacks=[Clock()],
                       peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainer.train()
    import resource

    rows[-1]["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return rows


def run_trl(options: dict, model: str, data: str, max_length: int, steps: int, out: str) -> list:
    spec = json.dumps({"options": options, "model": model, "data": data, "max_length": max_length, "steps": steps,
                       "out": out})
    done = subprocess.run([sys.executable, __file__, "--trl-worker", spec], check=True, capture_output=True, text=True,
                          env=worker_environment())
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rows: list, warmup: int) -> dict:
    measured = rows[warmup:]
    seconds = sum(row["step_s"] for row in measured)
    totals = {key: sum(row[key] for row in measured) for key in ("tokens", "real_tokens", "trained_tokens")}
    return {"steps": len(measured), "s_per_step": seconds / len(measured),
            **{f"{key}_per_s": value / seconds for key, value in totals.items()},
            "padding_share": 1 - totals["real_tokens"] / totals["tokens"], "peak_memory_gb": rows[-1]["peak_memory_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-worker")
    parser.add_argument("--datasets", nargs="+", default=list(MAX_LENGTH), choices=list(MAX_LENGTH))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--curve-steps", type=int, default=20, help="steps of the padded vs padding-free loss curves")
    parser.add_argument("--work", default="/tmp/gora_sft_throughput")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if args.trl_worker:
        print(json.dumps(trl_worker(json.loads(args.trl_worker))))
        return
    from trl_sft import assets

    os.makedirs(args.work, exist_ok=True)
    model, _ = assets(args.work)
    files = write_data(args.work)
    results = []
    configs = [(name, "ours", flags) for name, flags in OURS.items()] + [(name, "trl", o) for name, o in TRL.items()]
    order = [configs[i] for i in (0, 4, 2, 5, 1, 6, 3)]  # ours and TRL's alternating
    for dataset in args.datasets:
        for name, kind, setting in order:
            out = os.path.join(args.work, f"out-{dataset}-{len(results)}")
            runner = run_ours if kind == "ours" else run_trl
            rows = runner(setting, model, files[dataset], MAX_LENGTH[dataset], args.steps, out)
            results.append({"dataset": dataset, "config": name, "rows": rows, **summary(rows, args.warmup)})
            print(f"{dataset} {name}: {results[-1]['s_per_step']:.2f} s/step, "
                  f"{results[-1]['trained_tokens_per_s']:.0f} trained tok/s", flush=True)
            write_results(args, results)  # after every configuration: a stopped run keeps what it measured
    curves = {}
    for name in ("ours padded", "ours padding-free"):
        rows = run_ours(OURS[name], model, files["asdiv"], MAX_LENGTH["asdiv"], args.curve_steps,
                        os.path.join(args.work, f"curve-{len(curves)}"))
        curves[name] = [row["loss"] for row in rows]
    write_results(args, results, curves)


def write_results(args, results: list, curves: dict = None) -> None:
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "dirty": git_dirty("gora_dist", "benchmarks", untracked=False), "machine": f"{os.cpu_count()} CPU cores",
              "versions": package_versions("torch", "transformers", "trl", "peft"), "steps": args.steps,
              "warmup": args.warmup, "results": results, "curves": curves or {}}
    os.makedirs(args.results, exist_ok=True)
    json.dump(record, open(os.path.join(args.results, "sft_throughput_cpu.json"), "w"), indent=1)
    with open(os.path.join(args.results, "sft_throughput_cpu.md"), "w") as handle:
        handle.write(report(record))


def report(record: dict) -> str:
    lines = [f"# SFT training throughput ({record['date']}, commit {record['commit']}"
             f"{' + uncommitted changes' if record['dirty'] else ''})", "",
             f"`python benchmarks/sft_throughput.py --steps {record['steps']}`: {record['machine']}, fp32, "
             "SmolLM2-135M-Instruct, batch 8, LoRA budget r = 8 on 7 projections; steps after the first "
             f"{record['warmup']} measured. Packages: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()), ""]
    for dataset in dict.fromkeys(r["dataset"] for r in record["results"]):
        rows = [r for r in record["results"] if r["dataset"] == dataset]
        base = next((r for r in rows if r["config"] == "ours padded"), rows[0])
        lines += [f"## {dataset} (max_length {MAX_LENGTH[dataset]})", "",
                  "| configuration | s/step | positions/s | real tokens/s | trained tokens/s | padding share | "
                  "peak RSS GB | real tokens/s vs ours padded |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['config']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} "
                         f"| {r['trained_tokens_per_s']:.0f} | {r['padding_share']:.1%} | {r['peak_memory_gb']:.2f} | "
                         f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x |")
        lines.append("")
    curves = record.get("curves") or {}
    if len(curves) == 2:
        padded, free = curves["ours padded"], curves["ours padding-free"]
        worst = max(abs(a - b) / abs(a) for a, b in zip(padded, free))
        lines += [f"## Loss curves, padded vs padding-free (asdiv, {len(padded)} steps)", "",
                  f"Largest relative difference of a step's loss: {worst:.1e}.", "",
                  "| step | padded | padding-free |", "|---|---|---|"]
        lines += [f"| {step} | {a:.6f} | {b:.6f} |" for step, (a, b) in enumerate(zip(padded, free), start=1)]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
