"""The rank allocation as a picture: layer × module-type heat maps of rank and of importance."""

from __future__ import annotations

import re
from typing import Optional

from gora_dist.report import GoRAReport


def _layer_and_kind(name: str):
    match = re.search(r"\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1), name.rsplit(".", 1)[-1]


def plot_rank_map(report: GoRAReport, path: str, title: Optional[str] = None) -> None:
    """Write a PNG: left, the rank of each (layer, module type); right, its importance (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    cells = {_layer_and_kind(name): layer for name, layer in report.layers.items()}
    layers = sorted({key[0] for key in cells})
    kinds = list(dict.fromkeys(key[1] for key in cells))
    ranks = np.full((len(layers), len(kinds)), np.nan)
    importance = np.full_like(ranks, np.nan)
    for (layer, kind), entry in cells.items():
        ranks[layers.index(layer), kinds.index(kind)] = entry.rank
        importance[layers.index(layer), kinds.index(kind)] = max(entry.importance, 1e-30)

    height = max(3.0, 0.22 * len(layers) + 1.5)
    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.4 * len(kinds), height))
    shown = left.imshow(ranks, aspect="auto", cmap="viridis")
    figure.colorbar(shown, ax=left, label="rank")
    if len(layers) * len(kinds) <= 400:
        for row in range(len(layers)):
            for column in range(len(kinds)):
                if not np.isnan(ranks[row, column]):
                    left.text(column, row, int(ranks[row, column]), ha="center", va="center", color="w", fontsize=7)
    shown = right.imshow(importance, aspect="auto", cmap="magma", norm=LogNorm())
    figure.colorbar(shown, ax=right, label="importance avg(|W⊙Ḡ|)" if report.config.importance == "mean_abs_wg"
                    else f"importance ({report.config.importance})")
    for axis, label in ((left, "rank"), (right, "importance")):
        axis.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        axis.set_yticks(range(len(layers)), layers)
        axis.set_ylabel("layer")
        axis.set_title(label)
    budget = f"{report.param_count:,} params vs LoRA r={report.config.rank_ref}: {report.param_budget:,}"
    figure.suptitle(f"{title + ': ' if title else ''}GoRA rank map ({budget})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_losses(losses, path: str, title: Optional[str] = None) -> None:
    """Write a PNG of the training loss per step (a step whose loss was not finite is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(step, loss) for step, loss in enumerate(losses, start=1) if loss is not None]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if points:
        axis.plot(*zip(*points), linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3)
    axis.set_title(f"{title + ': ' if title else ''}training loss", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
