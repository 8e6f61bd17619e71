"""What the quality benchmarks share beside their methods: the runs file that makes a protocol
resumable, the training step, rate selection, mean ± std, a paired bootstrap, the environment record and the
loss-curve plot. Pure functions and one small class; no task in here. The optimizer and its schedule are
the launcher's (gora_dist.launcher.optimization), so a benchmark trains as the launcher does."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from provenance import git_commit, git_dirty


class RunLog:
    """Runs appended to a JSONL file as they finish. With ``resume`` the file's runs are read back
    and a run whose key is already there is not run again; without it the file starts empty."""

    def __init__(self, path: str, resume: bool, key_fields: Sequence[str]) -> None:
        self.path, self.key_fields = path, tuple(key_fields)
        self.rows: List[dict] = []
        if resume and os.path.exists(path):
            with open(path) as handle:
                self.rows = [json.loads(line) for line in handle if line.strip()]
        elif os.path.exists(path):
            os.remove(path)

    def key(self, row: dict) -> tuple:
        return tuple(row.get(name) for name in self.key_fields)

    def find(self, **key) -> Optional[dict]:
        wanted = tuple(key.get(name) for name in self.key_fields)
        return next((row for row in self.rows if self.key(row) == wanted), None)

    def get_or_run(self, run: Callable[[], dict], **key) -> dict:
        row = self.find(**key)
        if row is None:
            row = dict(key, **run())
            self.rows.append(row)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        return row


def train_step(model, batch: dict, params, optimizer, scheduler, autocast=None) -> float:
    """One AdamW step on ``batch`` (gradients clipped at norm 1): its loss, or NaN (and no step) when
    the loss is not finite."""
    model.train()
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    if not torch.isfinite(loss):
        return float("nan")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def best_rate(rows: Iterable[dict], score: Callable[[dict], float]) -> Optional[float]:
    """The ``lr`` of the row with the highest finite score (ties: the smaller rate); None if none is finite."""
    best = None
    for row in sorted(rows, key=lambda r: r["lr"]):
        value = score(row)
        if value is None or not math.isfinite(value):
            continue
        if best is None or value > best[1]:
            best = (row["lr"], value)
    return None if best is None else best[0]


def mean_std(values: Iterable[Optional[float]]) -> tuple:
    """(mean, sample std) of the finite values; (nan, nan) when there are none, std 0 for one."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]],
                     denominators: Optional[Sequence[float]] = None, draws: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """The gap between two methods scored on the same problems, with a bootstrap interval over the problems.

    ``first`` and ``second``: per seed, one numerator per problem (a match 0/1, a summed NLL); each
    method's metric is Σ numerator / Σ ``denominators`` (token counts; 1 each by default) of its
    seed-mean per problem. The problems are resampled together for both methods (paired), so a gap
    the test set's own luck could make shows as an interval that crosses 0: the seeds' std alone
    does not see that noise. Returns the gap (first − second) and the interval's ends."""
    a = torch.tensor([list(map(float, s)) for s in first], dtype=torch.float64).mean(0)
    b = torch.tensor([list(map(float, s)) for s in second], dtype=torch.float64).mean(0)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: {a.numel()} and {b.numel()} problems; a paired gap needs the same ones")
    d = torch.ones_like(a) if denominators is None else torch.tensor(list(map(float, denominators)), dtype=torch.float64)
    if d.shape != a.shape:
        raise ValueError(f"paired_bootstrap: {d.numel()} denominators for {a.numel()} problems")
    picks = torch.randint(0, a.numel(), (draws, a.numel()), generator=torch.Generator().manual_seed(seed))
    gaps = (a[picks].sum(1) - b[picks].sum(1)) / d[picks].sum(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(gaps, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return dict(gap=float((a.sum() - b.sum()) / d.sum()), low=low, high=high, level=level)


def rate_table(rows: List[dict], grid: Sequence[float], values: str, cell: Callable[[float], str]) -> List[str]:
    """Markdown lines: one row per method, one column per rate of ``grid``, ``cell(row[values][lr])``
    where the method ran at that rate, "—" where not."""
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in grid) + " |", "|---|" + "---|" * len(grid)]
    for row in rows:
        found = row[values]
        lines.append(f"| {row['method']} | " + " | ".join("—" if found.get(lr) is None else cell(found[lr])
                                                           for lr in grid) + " |")
    return lines


def rank_table(rows: List[dict], kinds: Sequence[str]) -> List[str]:
    """Markdown lines: each method's mean rank per layer kind (methods without adapters left out)."""
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {row['method']} | " + " | ".join(f"{row['mean_rank_by_kind'].get(k, float('nan')):.1f}" for k in kinds)
              + " |" for row in rows if row["mean_rank_by_kind"]]
    return lines


def timing_table(runs: List[dict], full_steps: int) -> List[str]:
    """Markdown lines: init seconds, seconds per training step, and init as a share of a full run's steps."""
    lines = [f"| method | init s | s / training step | init as % of {full_steps} training steps |", "|---|---|---|---|"]
    for row in runs:
        per_step = row["train_s"] / max(1, len(row["losses"]))
        lines.append(f"| {row['method']} | {row['init_s']:.2f} | {per_step:.3f} | "
                     f"{100 * row['init_s'] / (per_step * full_steps):.1f} % |")
    return lines


def environment() -> dict:
    """Machine, versions, commit (``+dirty`` with uncommitted tracked changes) and date of a result."""
    import peft
    import transformers

    dirty = git_dirty(untracked=False)
    return dict(machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU",
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                python=platform.python_version(), commit=(git_commit() or "unknown") + ("+dirty" if dirty else ""),
                date=time.strftime("%Y-%m-%d %H:%M %Z"), threads=torch.get_num_threads())


def plot_mean_curves(curves: Dict[str, List[List[float]]], path: str, *, title: str, ylabel: str,
                     window: int = 10) -> None:
    """One line per name: the mean over its curves (cut to the shortest), as a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for name, runs in curves.items():
        runs = [run for run in runs if run]
        if not runs:
            continue
        steps = min(len(run) for run in runs)
        mean = torch.tensor([run[:steps] for run in runs], dtype=torch.float64).mean(0)
        width = min(window, steps)
        smooth = torch.nn.functional.conv1d(mean.view(1, 1, -1), (torch.ones(width, dtype=torch.float64) / width)
                                            .view(1, 1, -1)).flatten()
        style = "-" if name.startswith("GoRA") else "--"
        axis.plot(range(width, width + len(smooth)), smooth, style, label=name, linewidth=1.4)
    axis.set_xlabel("step")
    axis.set_ylabel(f"{ylabel} (mean over seeds, moving average of {window})")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
