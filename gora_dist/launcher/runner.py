"""The launcher's run, one stage per module, in this order: data (tasks/) → processes → model
(loading) → GoRA's plan, estimated or resumed (planning) → training loop (training, loop) → final
adapter and metrics (results). ``launch/train.py`` calls :func:`main`."""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

from gora_dist.launcher.config import TrainConfig, load_config
from gora_dist.launcher.loading import loaded_model
from gora_dist.launcher.loop import train
from gora_dist.launcher.planning import plan_or_resume, resolve_gora, run_record
from gora_dist.launcher.processes import Setup, resolve_precision, started_processes, strip_launcher_arguments
from gora_dist.launcher.results import save_final_adapter
from gora_dist.launcher.tasks import Task, build_task
from gora_dist.launcher.tokenizer import load_tokenizer
from gora_dist.launcher.training import trainer_for


def main(argv: Optional[List[str]] = None) -> int:
    arguments, by_deepspeed = strip_launcher_arguments(sys.argv[1:] if argv is None else list(argv))
    run(resolve_precision(load_config(arguments)), by_deepspeed)
    return 0


def run(config: TrainConfig, by_deepspeed: bool = False) -> dict:
    """One run; returns metrics.json's content (rank 0's is the one written)."""
    task = build_task(config, load_tokenizer(config.model))  # bad data fails here: no process group, nothing written
    with started_processes(config, by_deepspeed) as setup:
        started = time.perf_counter()
        _announce(task, config, setup)
        with loaded_model(config, task, setup) as model:
            gora = resolve_gora(config, model, setup)
            record = run_record(config, gora)
            metrics = {"config": record, "world_size": setup.world, **_data_counts(task)}
            start = plan_or_resume(model, task, config, gora, setup)
            if not config.resume:
                metrics["init"] = dict(start.plan.report.timings)
                if config.init_only:
                    setup.say(f"init-only: initial adapter in {os.path.join(config.output_dir, 'init')}")
                    return metrics
            with trainer_for(model, start, config, setup) as trainer:
                trained = train(trainer, task, config, setup, start, record)
                metrics.update(trained.metrics)
                save_final_adapter(trainer, start.plan, trained, metrics, config, setup, started)
    return metrics


def _announce(task: Task, config: TrainConfig, setup: Setup) -> None:
    """Rank 0 makes the output folder and prints what the data holds."""
    if setup.main:
        os.makedirs(config.output_dir, exist_ok=True)
    for line in task.summary():
        setup.say(line)


def _data_counts(task: Task) -> dict:
    return {"data": task.data_counts()} if hasattr(task, "data_counts") else {}
