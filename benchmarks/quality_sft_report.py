"""quality_sft.py's results from its runs: the summary table, the paper's claims with their paired
intervals, the markdown, the JSON and the plots. Apart from the runs so a table can change without
touching how a run trains, and so the claims can be tested on made-up runs."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

from protocol import mean_std, paired_bootstrap, plot_mean_curves, rank_table, rate_table, timing_table
from quality_sft_setting import METHOD_SETTING, TARGETS, Setting


# ── ranks and the summary ──

def kind_of(layer: str) -> str:
    """The projection a layer name ends in; an unknown one fails loudly rather than dropping out of the means."""
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


def _stat(runs: List[dict], moment: str, metric: str) -> tuple:
    return mean_std([(r[moment] or {}).get(metric) for r in runs])


def summarise(tuning: List[dict], final: List[dict], regime: List[dict], rates: Dict[str, float],
              setting: Setting) -> dict:
    """Per method, the seeds' mean ± std early and final, ranks, budget and tuning; the regime's rows; the claims."""
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


# ── the paper's claims ──

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
        # LoRA-One's paper (arXiv 2502.01235) against LoRA-GA; and its control, rsLoRA's zero start at the
        # same α/√r scale; and whether GoRA's ranks add anything to LoRA-One's init
        compare("LoRA-One ≥ LoRA-GA (LoRA-One's claim)", "LoRA-One", "LoRA-GA", metric, higher)
        compare("LoRA-One ≥ rsLoRA (control: the same α/√r scaling)", "LoRA-One", "rsLoRA", metric, higher)
        compare("GoRA ranks (LoRA-One init) ≥ LoRA-One (the allocation)", "GoRA ranks (LoRA-One init)", "LoRA-One",
                metric, higher)
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


# ── markdown, plots, files ──

def markdown(summary: dict, setting: Setting, env: dict, command: str) -> str:
    """The results page: the setting in words (so the figures can be read alone), then every table."""
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
    """``--timing``'s page: init and step seconds, init as a share of a full run (what GoRA's init costs)."""
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
    """The regime's probes on a log step axis, one panel per base rate: where γ's head start fades."""
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


def write_timing(out: str, tag: str, final: List[dict], setting: Setting, env: dict) -> str:
    """``--timing``'s markdown, written to <out>/<tag>.md; its text (init's share is of a full run's steps)."""
    text = timing_markdown(final, setting, env, Setting().steps)
    with open(os.path.join(out, f"{tag}.md"), "w") as handle:
        handle.write(text)
    return text


def write_results(out: str, tag: str, tuning: List[dict], final: List[dict], regime: List[dict],
                  rates: Dict[str, float], setting: Setting, env: dict, command: str) -> str:
    """Summarise the runs and write <out>/<tag>.json, .md, _loss.png and _regime.png; the markdown's text."""
    summary = summarise(tuning, final, regime, rates, setting)
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
    return text
