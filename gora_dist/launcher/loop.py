"""The training loop: the held-out scores before (base model and GoRA's init, on a fresh start),
``steps`` optimizer steps on the run's global batches with evaluations and checkpoints on the way,
and the scores after."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from gora_dist.launcher.checkpoint import checkpoint_path, latest_checkpoint, write_checkpoint
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.flops import model_shape, peak_flops, step_flops
from gora_dist.launcher.gradients import NonFiniteStep, is_finite_step, nonfinite_message
from gora_dist.launcher.planning import Start
from gora_dist.launcher.preemption import Preempted, StopSignals
from gora_dist.launcher.processes import Setup
from gora_dist.launcher.step_log import StepLog, batch_counts, peak_memory_gb
from gora_dist.launcher.tasks import Task
from gora_dist.launcher.tasks.base import all_sum, rank_batches, scores_text
from gora_dist.memory_trace import phase
from gora_dist.model.devices import to_device
from gora_dist.model.layers import adapters_disabled
from gora_dist.pipeline.batches import global_batch_indices


@dataclasses.dataclass
class Trained:
    """What the loop leaves for the final adapter: metrics (``<metric>_base`` / ``_before`` / ``_after``
    and the losses, in that order), the shown held-out samples per stage, the scores after."""

    metrics: dict
    samples: Dict[str, List[dict]]
    scores: dict


def train(trainer, task: Task, config: TrainConfig, setup: Setup, start: Start, record: dict,
          signals: StopSignals) -> Trained:
    """Evaluate, train from ``start.step`` to ``config.steps``, evaluate. ``record``: the run's
    options, saved in each checkpoint. The metrics hold the whole run, resumed segments included.
    ``signals``: the stop signals noted since the run began (acted on at the next step's end)."""
    eval_batch = config.eval_batch_size or setup.micro
    history = {"losses": [], "grad_norms": [], "skipped_steps": [], "resumed_at": [], **start.history}
    samples: Dict[str, List[dict]] = {"base": [], "before": []}
    phase("evaluation")
    if start.step == 0 and config.eval_base:
        with adapters_disabled(trainer.model):
            scores, samples["base"] = evaluate(trainer, task, setup, eval_batch)
        history.update({f"{name}_base": value for name, value in scores.items()})
        setup.say("base model (adapters off): " + scores_text(scores))
    if start.step == 0:
        scores, samples["before"] = evaluate(trainer, task, setup, eval_batch)
        history.update({f"{name}_before": value for name, value in scores.items()})
        setup.say("before training: " + scores_text(scores))
    log = StepLog(config.output_dir, config.report_to, setup.main, start.step, record)
    try:
        if start.step == 0:
            log.write({"kind": "eval", "step": 0, **scores}, prefix="eval")
        _steps(trainer, task, config, setup, start, record, eval_batch, history, signals, log)
        phase("evaluation")
        scores, samples["after"] = evaluate(trainer, task, setup, eval_batch)
        log.write({"kind": "eval", "step": config.steps, **scores}, prefix="eval")
    finally:
        log.close()
    metrics = {**history, "step": config.steps, **{f"{name}_after": value for name, value in scores.items()}}
    return Trained(metrics, samples, scores)


def evaluate(trainer, task: Task, setup: Setup, batch_size: int):
    """(metrics, samples) of the task on its held-out examples, with dropout off (a collective)."""
    trainer.train_mode(False)
    return task.evaluate(trainer, setup, batch_size)


def _steps(trainer, task: Task, config: TrainConfig, setup: Setup, start: Start, record: dict,
           eval_batch: int, history: dict, signals: StopSignals, log: StepLog) -> None:
    """The optimizer steps, appended to ``history`` (saved in each checkpoint): each step's loss
    averaged over ranks, its gradient norm before clipping, the steps skipped. Training draws stream 0
    of the global batches, from its first batch whatever the start: a resume sees the same data. A
    step whose loss or norm is not finite stops the run before its update (every rank agrees: both
    values are global), or with skip_nonfinite skips it. SIGTERM/SIGUSR1 on any rank: the step in
    progress finishes, a checkpoint is written, :class:`Preempted` is raised."""
    stream = global_batch_indices(len(task.train), config.global_batch_size, config.seed, stream=0)
    for _ in range(start.step):
        next(stream)
    shape = model_shape(trainer.model)
    peak, peak_source = peak_flops(setup.device, shape.dtype, config.peak_tflops)
    setup.say(f"model FLOPs a token (launcher/flops.py): 4 x {shape.linear:,} frozen + 6 x {shape.adapters:,} adapter "
              f"parameters + attention; mfu: {'peak from ' + peak_source if peak else 'none, ' + peak_source}")
    bar = setup.progress(range(start.step, config.steps), desc="training", unit="step")
    for step in bar:
        done = step + 1
        started = time.perf_counter()
        phase("training")
        trainer.train_mode(True)  # dropout on (evaluate switches it off)
        # dropout masks from (seed, step, rank): a resume at the same world size repeats them exactly
        torch.manual_seed(config.seed * 1_000_003 + step * 7919 + setup.rank)
        batches = rank_batches(task, next(stream), setup)
        counts = [sum(column) for column in zip(*(batch_counts(batch) for batch in batches))]
        micro_losses = [trainer.micro_step(to_device(batch, setup.device), setup.accumulation) for batch in batches]
        loss_sum, stops, tokens, real, trained, squared = all_sum([sum(micro_losses) / len(micro_losses), signals.flag, *counts],
                                                          setup)
        loss = loss_sum / setup.world
        norm = trainer.gradient_norm()
        finite = is_finite_step(loss, norm)
        if not finite and not config.skip_nonfinite:
            raise NonFiniteStep(nonfinite_message(done, loss, norm, latest_checkpoint(config.output_dir)))
        lr = trainer.learning_rate()
        trainer.optimizer_step(norm, skip=not finite)
        seconds = time.perf_counter() - started
        memory, measured = peak_memory_gb(setup.device)
        throughput = step_flops(shape, real, squared, trained) / seconds / setup.world  # per device
        flops = {"model_tflops_per_s": throughput / 1e12, **({"mfu": throughput / peak} if peak else {})}
        log.write({"kind": "step", "step": done, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(norm),
                   "skipped": not finite, "step_s": seconds, "tokens": int(tokens), "real_tokens": int(real),
                   "trained_tokens": int(trained), "real_tokens_per_s": real / seconds,
                   "trained_tokens_per_s": trained / seconds, "peak_memory_gb": memory, "peak_memory": measured,
                   **flops})
        if not finite:
            history["skipped_steps"].append(done)
            setup.say(f"step {done}: loss {loss}, gradient norm {norm} (not finite): update skipped "
                      f"({len(history['skipped_steps'])} so far)")
        history["losses"].append(finite_or_none(loss))
        history["grad_norms"].append(finite_or_none(norm))
        if setup.main and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", trained_tok_s=f"{trained / seconds:.0f}")
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            scores = evaluate(trainer, task, setup, eval_batch)[0]
            setup.say(f"step {done}: " + scores_text(scores))
            log.write({"kind": "eval", "step": done, **scores}, prefix="eval")
        due = config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps)
        if due or stops:
            phase("checkpoint")
            path = _checkpoint(trainer, start, config, setup, done, record, history)
        if stops:
            raise Preempted(done, path, signals.name())


def finite_or_none(value: float):
    """JSON has no NaN or infinity: a non-finite value is written as null."""
    return value if math.isfinite(value) else None


def _checkpoint(trainer, start: Start, config: TrainConfig, setup: Setup, step: int, record: dict,
                history: dict) -> str:
    """Every rank joins the gathers; rank 0 writes; all wait for it. Returns the checkpoint's folder."""
    current = start.plan.with_trainable(trainer.full_trainable())
    optimizer_state = trainer.full_optimizer_state()
    path = checkpoint_path(config.output_dir, step)
    if setup.main:
        write_checkpoint(config.output_dir, step, current, optimizer_state,
                         {"model": config.model, "world_size": setup.world, "config": record, "run_id": start.run_id,
                          "history": history}, keep=config.keep_checkpoints)
    if setup.world > 1:
        dist.barrier()
    return path
