"""GoRA's plan for the run: its options resolved against the loaded model, then the plan estimated
on the training data (saved as the initial adapter, with its rank map) or, on resume, read back
from the last checkpoint."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

from gora_dist.config import GoRAConfig
from gora_dist.launcher.checkpoint import newest_readable_checkpoint
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.models import checkpointing_in_eval_mode
from gora_dist.launcher.processes import Setup, deepspeed_config
from gora_dist.launcher.resume_check import data_fingerprint, record_changes
from gora_dist.launcher.targets import resolve_targets
from gora_dist.launcher.tasks import Task
from gora_dist.launcher.tasks.base import rank_batches
from gora_dist.memory_trace import phase
from gora_dist.model.adapter_io import save_plan
from gora_dist.model.converted_adapter import plan_from_converted
from gora_dist.pipeline.batches import global_batch_indices
from gora_dist.report import GoRAPlan, GoRAReport

ESTIMATION_ENGINE = {"local": "local", "ddp": "ddp", "fsdp2": "fsdp2", "zero3": "zero3", "zero2": "ddp"}
"""The engine GoRA estimates under: ZeRO-2 shards no weights, so DDP's view of the gradients serves."""


@dataclasses.dataclass
class Start:
    """Where training starts: the plan (estimated, or a checkpoint's trained adapters), the optimizer
    steps already taken, and (on resume) the optimizer's moments."""

    plan: GoRAPlan
    step: int = 0
    optimizer_state: Optional[Dict[str, torch.Tensor]] = None
    history: dict = dataclasses.field(default_factory=dict)
    """The steps before ``step``: {"losses", "grad_norms", "skipped_steps", "resumed_at"}."""
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    """The run's id, kept across resumes: checkpoints carry it and pruning counts only this run's."""


def resolve_gora(config: TrainConfig, model: nn.Module, setup: Setup) -> GoRAConfig:
    """The run's GoRA options, fixed once: target_modules ``auto`` / ``all-linear`` become the model's
    layer names, and grad_steps counts backward passes (global batches × micro-batches per rank),
    which is what ``estimate_plan`` counts and gora.json records."""
    asked = config.gora
    targets = resolve_targets(asked.target_modules, model, asked.modules_to_save)
    if asked.adaptive_grad_steps and setup.accumulation > 1:
        raise ValueError(f"gora.adaptive_grad_steps counts backward passes; with {setup.accumulation} micro-batches per "
                         "global batch it could stop inside one and depend on the world size: set micro_batch_size so "
                         "that global_batch_size = micro_batch_size x world size, or turn adaptive steps off")
    return dataclasses.replace(asked, target_modules=targets, grad_steps=asked.grad_steps * setup.accumulation)


def run_record(config: TrainConfig, gora: GoRAConfig) -> dict:
    """The run's options as asked, naming the layers adapted (metrics.json, checkpoints); grad_steps
    stays in global batches, so the record can be run again."""
    record = config.to_dict()
    record["gora"]["target_modules"] = gora.to_dict()["target_modules"]
    record["data_fingerprint"] = data_fingerprint(config.data)
    return record


def plan_or_resume(model: nn.Module, task: Task, config: TrainConfig, gora: GoRAConfig, setup: Setup,
                   record: dict) -> Start:
    if config.resume:
        return _resume(config, gora, setup, record)
    return Start(_estimate(model, task, config, gora, setup))


def _estimate(model: nn.Module, task: Task, config: TrainConfig, gora: GoRAConfig, setup: Setup) -> GoRAPlan:
    """GoRA's estimation under the run's engine on ``config.gora.grad_steps`` global batches of a
    stream of their own; rank 0 saves the initial adapter, prints the rank table, plots the map."""
    from gora_dist.pipeline.sharded import estimate_plan

    global_batches = config.gora.grad_steps
    needed = global_batches * config.global_batch_size
    if len(task.train) < needed:
        raise ValueError(f"{len(task.train)} training examples are too few for gora.grad_steps={global_batches} x "
                         f"global_batch_size={config.global_batch_size} = {needed}")
    engine = ESTIMATION_ENGINE[setup.engine]
    extra = {"ds_config": deepspeed_config(config, setup, 3, accumulation=1)} if engine == "zero3" else {}
    phase("gradient steps")  # build_plan enters "init" after them
    with checkpointing_in_eval_mode(model):
        plan = estimate_plan(model, _estimation_batches(task, config, setup, global_batches), gora, engine=engine,
                             loss_fn=getattr(task, "loss_fn", None), timeout_s=config.timeout_s, on_phase=phase,
                             **extra)
    if plan.report.grad_steps:
        plan.report.notes.append(f"{plan.report.grad_steps} backward passes = {global_batches} global batches "
                                 f"of {config.global_batch_size} ({setup.accumulation} micro-batches of {setup.micro} per rank)")
    if setup.main:
        out = config.output_dir
        save_plan(plan, os.path.join(out, "init"), model)
        setup.say(plan.report.table())
        from gora_dist.launcher.plot import plot_rank_map

        plot_rank_map(plan.report, os.path.join(out, "rank_map.png"), title=config.model)
    return plan


def _estimation_batches(task: Task, config: TrainConfig, setup: Setup, global_batches: int) -> Iterator[dict]:
    """This rank's micro-batches of each global batch, in order (stream 1: training draws stream 0)."""
    stream = global_batch_indices(len(task.train), config.global_batch_size, config.seed, stream=1)
    bar = setup.progress(None, total=global_batches, desc="GoRA gradient estimation", unit="batch")
    for _ in range(global_batches):
        micro_batches = rank_batches(task, next(stream), setup)
        for index, batch in enumerate(micro_batches):
            if bar is not None and index == len(micro_batches) - 1:
                bar.update(1)  # counted when its last micro-batch is handed over
                if bar.n == global_batches:
                    bar.close()
            yield batch


def _resume(config: TrainConfig, gora: GoRAConfig, setup: Setup, record: dict) -> Start:
    """The last complete checkpoint's adapters, saved modules and optimizer state, at any world size;
    refused when it was made for another model, other target modules, or (unless resume_changes is
    ok) other data, split, seed, batch, length, task or GoRA options; never a step past ``steps``."""
    found = newest_readable_checkpoint(config.output_dir, setup.say)
    if found is None:
        raise ValueError(f"--resume: no complete checkpoint under {config.output_dir}/checkpoints")
    path, (saved, weights, optimizer_state, state) = found
    problems = []
    if state.get("model") != config.model:
        problems.append(f"model {state.get('model')!r} there, {config.model!r} here")
    wanted = gora.to_dict()["target_modules"]
    if saved["config"]["target_modules"] != wanted:
        problems.append(f"target_modules {saved['config']['target_modules']} there, {wanted} here")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))
    refused, allowed = record_changes(state.get("config", {}), record)
    if refused and config.resume_changes != "ok":
        raise ValueError(f"cannot resume from {path}: the run there differs in what sets the data order or the "
                         f"objective: {'; '.join(refused)}. Pass --resume-changes ok to resume anyway, or run the "
                         "checkpoint's options")
    for change in refused + allowed:
        setup.say(f"resuming with a changed option: {change}")
    if state["step"] > config.steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']}, past steps={config.steps}; a "
                         f"resume never goes back to an earlier step: pass --steps {state['step']} or more")
    if saved.get("converted_for_original_base"):  # LoRA-GA / PiSSA: trained and initial halves
        plan = plan_from_converted(GoRAReport.from_dict(saved), weights, state.pop("saved_state"))
    else:
        plan = GoRAPlan.from_adapters(GoRAReport.from_dict(saved), weights, state.pop("saved_state"))
    setup.say(f"resuming from {path} at step {state['step']} (world size {state.get('world_size')} -> {setup.world})")
    history = dict(state.get("history", {}))
    history["resumed_at"] = list(history.get("resumed_at", [])) + [state["step"]]
    kept = {"run_id": state["run_id"]} if state.get("run_id") else {}
    return Start(plan, state["step"], optimizer_state, history, **kept)
