"""What a run leaves behind at its end: the trained adapter (PEFT format, with gora.json), the shown
generations (generations.jsonl) and metrics.json."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List

from gora_dist.launcher.checkpoint import check_finite
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.files import write_atomically, write_json
from gora_dist.launcher.loop import Trained
from gora_dist.launcher.processes import Setup
from gora_dist.launcher.tasks.base import scores_text
from gora_dist.memory_trace import phase
from gora_dist.model.adapter_io import save_plan
from gora_dist.report import GoRAPlan


def save_final_adapter(trainer, plan: GoRAPlan, trained: Trained, metrics: dict, config: TrainConfig, setup: Setup,
                       started: float) -> None:
    """Every rank joins the gather of the trained tensors; rank 0 writes. ``metrics``: metrics.json's
    content, which gets the run's wall time (since ``started``, a perf_counter reading)."""
    phase("final adapter")
    final = plan.with_trainable(trainer.full_trainable())
    out = config.output_dir
    if setup.main:
        check_finite(final, {}, "the final adapter")
        save_plan(final, os.path.join(out, "adapter"), trainer.model)
        if trained.samples["after"]:
            _write_generations(os.path.join(out, "generations.jsonl"), trained.samples)
        metrics["wall_s"] = time.perf_counter() - started
        write_json(os.path.join(out, "metrics.json"), metrics)
        from gora_dist.launcher.plot import plot_losses

        plot_losses(metrics.get("losses", []), os.path.join(out, "loss.png"), title=config.model)
    setup.say(f"after training: {scores_text(trained.scores)}; adapter in {os.path.join(out, 'adapter')}")


def _write_generations(path: str, samples: Dict[str, List[dict]]) -> None:
    """One JSON line per shown held-out example: prompt, reference, and the generation (with whether
    it matches) of the base model (--eval-base), of GoRA's init before training, and after training."""
    rows: Dict[int, dict] = {}
    for stage in ("base", "before", "after"):
        for sample in samples[stage]:
            row = rows.setdefault(sample["index"], {key: sample[key] for key in ("index", "origin", "prompt", "reference")})
            row.update({stage: sample["generation"], f"match_{stage}": sample["match"]})
    write_atomically(path, lambda handle: handle.writelines(json.dumps(rows[index], ensure_ascii=False) + "\n"
                                                            for index in sorted(rows)))
