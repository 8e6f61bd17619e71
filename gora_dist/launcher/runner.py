"""The launcher's run, one stage per module, in this order: data (tasks/) → processes → model
(loading) → GoRA's plan, estimated or resumed (planning) → training loop (training, loop) → final
adapter and metrics (results). ``launch/train.py`` calls :func:`main`."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import List, Optional

from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.config import TrainConfig, steps_for_epochs
from gora_dist.launcher.loading import loaded_model
from gora_dist.launcher.loop import train
from gora_dist.launcher.planning import plan_or_resume, resolve_gora, run_record
from gora_dist.launcher.preemption import StopSignals
from gora_dist.launcher.processes import Setup, resolve_precision, started_processes, strip_launcher_arguments
from gora_dist.launcher.results import save_final_adapter
from gora_dist.launcher.step_log import check_reporter
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
    config = steps_for_epochs(config, len(task.train))
    check_reporter(config.report_to)
    earlier = earlier_run_files(config.output_dir)
    if earlier and not config.resume and not config.overwrite:
        raise ValueError(f"output_dir {config.output_dir} holds an earlier run's {', '.join(earlier)}: pass --resume to "
                         "continue it, --overwrite to clear them, or another --output-dir")
    with StopSignals() as signals, started_processes(config, by_deepspeed) as setup:
        started = time.perf_counter()
        _announce(task, config, setup)
        with loaded_model(config, task, setup) as model:
            if hasattr(task, "check_model"):
                setup.say(task.check_model(model))  # before anything is written
            gora = resolve_gora(config, model, setup)
            record = run_record(config, gora)
            metrics = {"config": record, "world_size": setup.world, **_data_counts(task)}
            start = plan_or_resume(model, task, config, gora, setup, record)
            if not config.resume:
                metrics["init"] = dict(start.plan.report.timings)
                if config.init_only:
                    setup.say(f"init-only: initial adapter in {os.path.join(config.output_dir, 'init')}")
                    return metrics
            with trainer_for(model, start, config, setup, getattr(task, "loss_fn", None)) as trainer:
                trained = train(trainer, task, config, setup, start, record, signals)
                metrics.update(trained.metrics)
                save_final_adapter(trainer, start.plan, trained, metrics, config, setup, started)
    return metrics


EARLIER_RUN = ("checkpoints", "adapter", "metrics.json", "generations.jsonl")
"""What a fresh run would overwrite or mix with its own (init/ and the plots are simply rewritten)."""


def earlier_run_files(output_dir: str) -> List[str]:
    return [name for name in EARLIER_RUN if os.path.exists(os.path.join(output_dir, name))]


def _announce(task: Task, config: TrainConfig, setup: Setup) -> None:
    """Rank 0 clears an earlier run (--overwrite) and prints what the data holds. The output folder is
    made by the first file written (the initial adapter), so a run refused after the processes
    started (targets that match nothing, a batch that does not divide) leaves nothing behind."""
    if setup.main and config.overwrite and not config.resume:
        for name in earlier_run_files(config.output_dir):
            path = os.path.join(config.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for line in task.summary():
        setup.say(line)


def _data_counts(task: Task) -> dict:
    return {"data": task.data_counts()} if hasattr(task, "data_counts") else {}
