"""The launcher's run: data (read and checked before any process group) → distributed setup → model
→ GoRA plan (or resume) → training under the engine → checkpoints → final adapter and metrics.
``launch/train.py`` calls :func:`main`; the task (launcher/tasks/) makes the batches and scores the model."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from gora_dist.engines.choice import choose_engine
from gora_dist.launcher.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from gora_dist.launcher.config import TrainConfig, load_config
from gora_dist.launcher.models import checkpointing_in_eval_mode, enable_gradient_checkpointing, load_model
from gora_dist.launcher.targets import resolve_targets
from gora_dist.launcher.tasks import Task, build_task
from gora_dist.launcher.tasks.base import all_sum
from gora_dist.launcher.tokenizer import TINY_MODELS, load_tokenizer
from gora_dist.memory_trace import phase
from gora_dist.memory_trace import write_now as write_memory_trace
from gora_dist.model.adapter_io import save_plan
from gora_dist.model.devices import to_device
from gora_dist.model.layers import adapters_disabled
from gora_dist.pipeline.apply import apply_plan
from gora_dist.pipeline.batches import global_batch_indices, rank_micro_batches
from gora_dist.report import GoRAPlan, GoRAReport

ESTIMATION_ENGINE = {"local": "local", "ddp": "ddp", "fsdp2": "fsdp2", "zero3": "zero3", "zero2": "ddp"}


@dataclasses.dataclass
class Setup:
    engine: str
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _strip_launcher_arguments(argv: List[str]) -> tuple:
    """The deepspeed launcher appends ``--local_rank=N``: drop it, and remember who launched us."""
    kept = [a for a in argv if not a.startswith("--local_rank")]
    return kept, len(kept) != len(argv)


def setup_distributed(config: TrainConfig, by_deepspeed: bool) -> Setup:
    """Pick the engine, start the process group (gloo on the CPU, nccl on GPUs) if one is needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = config.engine
    if engine == "auto":
        engine, _ = choose_engine(zero3=by_deepspeed, fsdp=None, world=world, cpu=not torch.cuda.is_available())
    if engine == "local" and world > 1:
        raise ValueError(f"engine=local with WORLD_SIZE={world}: pick ddp, fsdp2, zero3 or zero2 for several processes")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if engine == "local":
        return Setup(engine, 0, 1, device)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = timedelta(seconds=config.timeout_s)
    backend = "nccl" if cuda else "gloo"
    if engine in ("zero3", "zero2"):
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ValueError(f"engine={engine} needs DeepSpeed: pip install deepspeed") from None
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return Setup(engine, dist.get_rank(), dist.get_world_size(), device)


def deepspeed_config(config: TrainConfig, stage: int, micro: int, accumulation: int, world: int) -> dict:
    """The user's DeepSpeed JSON (if any) with our stage, batch sizes and precision."""
    base = {}
    if config.ds_config:
        with open(config.ds_config) as handle:
            base = json.load(handle)
    base.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation,
                train_batch_size=micro * accumulation * world, zero_allow_untested_optimizer=True,
                steps_per_print=2**31 - 1)
    base.setdefault("zero_optimization", {})["stage"] = stage
    if config.precision == "bf16":
        base["bf16"] = {"enabled": True}
    return base


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


def _all_mean(value: float, setup: Setup) -> float:
    return all_sum([value], setup)[0] / setup.world


def evaluate(trainer, task: Task, setup: Setup, batch_size: int):
    """(metrics, samples) of the task on its held-out examples, with dropout off (a collective)."""
    trainer.train_mode(False)
    return task.evaluate(trainer, setup, batch_size)


def rank_batches(task: Task, train, global_indices: List[int], setup: Setup, micro: int) -> List[dict]:
    """This rank's micro-batches of one global batch, each knowing the global batch it belongs to."""
    whole = [train[i] for i in global_indices]
    share = len(global_indices) // micro  # ranks x micro-batches per rank
    return [task.batch([train[i] for i in indices], global_batch=whole, share=share)
            for indices in rank_micro_batches(global_indices, setup.rank, setup.world, micro)]


def _estimation_batches(task: Task, config, setup, micro, progress):
    stream = global_batch_indices(len(task.train), config.global_batch_size, config.seed, stream=1)
    steps = config.gora_config().grad_steps
    bar = _progress(None, progress, total=steps, desc="GoRA gradient estimation", unit="batch") if progress else None
    for _ in range(steps):
        micro_batches = rank_batches(task, task.train, next(stream), setup, micro)
        for index, batch in enumerate(micro_batches):
            if bar is not None and index == len(micro_batches) - 1:
                bar.update(1)  # counted when its last micro-batch is handed over
                if bar.n == steps:
                    bar.close()
            yield batch


def _check_resume(gora: dict, state: dict, config: TrainConfig, path: str) -> None:
    saved_targets = gora["config"]["target_modules"]
    wanted = config.gora_config().to_dict()["target_modules"]
    problems = []
    if state.get("model") != config.model:
        problems.append(f"model {state.get('model')!r} there, {config.model!r} here")
    if saved_targets != wanted:
        problems.append(f"target_modules {saved_targets} there, {wanted} here")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


def _labels(task: Task) -> tuple:
    return tuple(getattr(task, "label_names", ("negative", "positive")))


def _fsdp2_policy(config: TrainConfig):
    from gora_dist.engines.fsdp2 import mixed_precision

    return mixed_precision(torch.bfloat16 if config.precision == "bf16" else None)


def _shard_fsdp2(model, config: TrainConfig) -> None:
    """fully_shard each transformer block and the embeddings, then the root (estimation and training
    share this model)."""
    from gora_dist.engines.fsdp2 import fully_shard_model

    fully_shard_model(model, mp_policy=_fsdp2_policy(config))


def _load(config: TrainConfig, task: Task, setup: Setup, zero3_config: Optional[dict] = None):
    """The model as the engine holds it, loaded once for estimation and training: FSDP2-sharded (each
    rank its own shards), ZeRO-3-partitioned while loading (``sharded_models.load_zero3``, with the
    caller's ``keep_zero3_loading`` alive), or whole on this rank's device."""
    torch.manual_seed(config.seed)  # a new classification head starts the same on every rank
    options = dict(task=config.task, labels=_labels(task), precision=config.precision, max_length=config.max_length)
    say = print if setup.main else (lambda *a, **k: None)
    if setup.engine == "fsdp2":
        from gora_dist.launcher.sharded_models import load_fsdp2

        return load_fsdp2(config.model, lambda model: _shard_fsdp2(model, config), setup.device, say=say, **options)
    if setup.engine == "zero3":
        from gora_dist.launcher.sharded_models import load_zero3

        return load_zero3(config.model, zero3_config, say=say, **options)
    return load_model(config.model, **options).to(setup.device)  # local, ddp, zero2: the whole model per rank


def _resolve_targets(config: TrainConfig, model) -> None:
    """target_modules auto / all-linear -> the model's layer names, written back into config.gora."""
    heads = config.gora_config().modules_to_save or ()
    config.gora["target_modules"] = resolve_targets(config.gora.get("target_modules", "auto"), model, heads)


def _write_generations(path: str, base: List[dict], before: List[dict], after: List[dict]) -> None:
    """One JSON line per shown held-out example: prompt, reference, and the generation (with whether
    it matches) of the base model (--eval-base), of GoRA's init before training, and after training."""
    rows: Dict[int, dict] = {}
    for stage, samples in (("base", base), ("before", before), ("after", after)):
        for sample in samples:
            row = rows.setdefault(sample["index"], {key: sample[key] for key in ("index", "origin", "prompt", "reference")})
            row.update({stage: sample["generation"], f"match_{stage}": sample["match"]})
    with open(path, "w") as handle:
        for index in sorted(rows):
            handle.write(json.dumps(rows[index], ensure_ascii=False) + "\n")


def run(config: TrainConfig, setup: Setup, task: Task) -> dict:
    out = config.output_dir
    if setup.main:
        os.makedirs(out, exist_ok=True)
    say = print if setup.main else (lambda *a, **k: None)
    started = time.perf_counter()
    for line in task.summary():
        say(line)

    train = task.train
    micro = config.micro_batch_size or config.global_batch_size // setup.world
    if micro < 1 or config.global_batch_size % (micro * setup.world):
        raise ValueError(f"global_batch_size={config.global_batch_size} is not a multiple of micro_batch_size={micro} "
                         f"x world size {setup.world}")
    accumulation = config.global_batch_size // (micro * setup.world)
    zero3_loading = zero3_config = None
    if setup.engine == "zero3" and config.model not in TINY_MODELS:  # the random test models are built, not loaded
        from gora_dist.launcher.sharded_models import keep_zero3_loading

        zero3_config = deepspeed_config(config, 3, micro, accumulation, setup.world)
        zero3_loading = keep_zero3_loading(zero3_config)  # noqa: F841 (lives for the run)
    phase("load")
    model = _load(config, task, setup, zero3_config)
    _resolve_targets(config, model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    gora = config.gora_config()
    if gora.adaptive_grad_steps and accumulation > 1:
        raise ValueError(f"gora.adaptive_grad_steps counts backward passes; with {accumulation} micro-batches per global "
                         "batch it could stop inside one and depend on the world size: set micro_batch_size so that "
                         "global_batch_size = micro_batch_size x world size, or turn adaptive steps off")
    ds_stage = {"zero3": 3, "zero2": 2}.get(setup.engine)

    eval_batch = config.eval_batch_size or micro
    start_step, optimizer_tensors = 0, None
    metrics = {"config": config.to_dict(), "world_size": setup.world}
    if hasattr(task, "data_counts"):
        metrics["data"] = task.data_counts()
    if config.resume:
        path = latest_checkpoint(out)
        if path is None:
            raise ValueError(f"--resume: no complete checkpoint under {out}/checkpoints")
        saved, weights, optimizer_tensors, state = read_checkpoint(path)
        _check_resume(saved, state, config, path)
        report = GoRAReport.from_dict(saved)
        plan = GoRAPlan.from_adapters(report, weights, state.pop("saved_state"))
        start_step = state["step"]
        say(f"resuming from {path} at step {start_step} (world size {state.get('world_size')} -> {setup.world})")
    else:
        needed = gora.grad_steps * config.global_batch_size
        if len(train) < needed:
            raise ValueError(f"{len(train)} training examples are too few for gora.grad_steps={gora.grad_steps} x "
                             f"global_batch_size={config.global_batch_size} = {needed}")
        from gora_dist.pipeline.sharded import estimate_plan

        estimation = dataclasses.replace(gora, grad_steps=gora.grad_steps * accumulation)
        batches = _estimation_batches(task, config, setup, micro, setup.main)
        extra = {"ds_config": deepspeed_config(config, 3, micro, 1, setup.world)} if ESTIMATION_ENGINE[setup.engine] == "zero3" else {}
        phase("gradient steps")  # build_plan enters "init" after them
        with checkpointing_in_eval_mode(model):
            plan = estimate_plan(model, batches, estimation, engine=ESTIMATION_ENGINE[setup.engine],
                                 timeout_s=config.timeout_s, on_phase=phase, **extra)
        plan.report.config = gora
        plan.report.notes.append(f"{plan.report.grad_steps} backward passes = {gora.grad_steps} global batches "
                                 f"of {config.global_batch_size} ({accumulation} micro-batches of {micro} per rank)")
        if setup.main:
            save_plan(plan, os.path.join(out, "init"), model)
            say(plan.report.table())
            from gora_dist.launcher.plot import plot_rank_map

            plot_rank_map(plan.report, os.path.join(out, "rank_map.png"), title=config.model)
        metrics["init"] = dict(plan.report.timings)
        if config.init_only:
            say(f"init-only: initial adapter in {os.path.join(out, 'init')}")
            return metrics

    phase("training setup")
    trainer = _training(model, plan, config, setup, micro, accumulation, ds_stage)
    samples_before: List[dict] = []
    samples_base: List[dict] = []
    try:
        if optimizer_tensors is not None:
            trainer.load_optimizer_state(optimizer_tensors, start_step)
        phase("evaluation")
        if start_step == 0 and config.eval_base:
            with adapters_disabled(trainer.model):
                scores, samples_base = evaluate(trainer, task, setup, eval_batch)
            metrics.update({f"{name}_base": value for name, value in scores.items()})
            say("base model (adapters off): " + _scores(scores))
        if start_step == 0:
            scores, samples_before = evaluate(trainer, task, setup, eval_batch)
            metrics.update({f"{name}_before": value for name, value in scores.items()})
            say("before training: " + _scores(scores))
        stream = global_batch_indices(len(train), config.global_batch_size, config.seed, stream=0)
        for _ in range(start_step):
            next(stream)
        losses = []
        bar = _progress(range(start_step, config.steps), setup.main, desc="training", unit="step")
        for step in bar:
            phase("training")
            trainer.train_mode(True)  # dropout on (evaluate switches it off)
            # dropout masks from (seed, step, rank): a resume at the same world size repeats them exactly
            torch.manual_seed(config.seed * 1_000_003 + step * 7919 + setup.rank)
            micro_losses = [trainer.micro_step(to_device(batch, setup.device), accumulation)
                            for batch in rank_batches(task, train, next(stream), setup, micro)]
            trainer.optimizer_step()
            loss = _all_mean(sum(micro_losses) / len(micro_losses), setup)
            losses.append(loss)
            if setup.main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                say(f"step {done}: " + _scores(evaluate(trainer, task, setup, eval_batch)[0]))
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                phase("checkpoint")
                _checkpoint(trainer, plan, config, setup, done)
        metrics["losses"] = losses
        phase("evaluation")
        scores, samples_after = evaluate(trainer, task, setup, eval_batch)
        metrics.update({f"{name}_after": value for name, value in scores.items()})
        phase("final adapter")
        final = _current_plan(trainer, plan)
        if setup.main:
            save_plan(final, os.path.join(out, "adapter"), model)
            if samples_after:
                _write_generations(os.path.join(out, "generations.jsonl"), samples_base, samples_before, samples_after)
            metrics["wall_s"] = time.perf_counter() - started
            with open(os.path.join(out, "metrics.json"), "w") as handle:
                json.dump(metrics, handle, indent=2)
        say(f"after training: {_scores(scores)}; adapter in {os.path.join(out, 'adapter')}")
    finally:
        trainer.close()
    return metrics


def _scores(scores: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())


def _current_plan(trainer, plan: GoRAPlan) -> GoRAPlan:
    """The plan with the adapters' (and saved modules') current full weights."""
    return GoRAPlan.from_trainable(plan.report, trainer.full_trainable())


def _checkpoint(trainer, plan, config: TrainConfig, setup: Setup, step: int) -> None:
    current = _current_plan(trainer, plan)
    optimizer_state = trainer.full_optimizer_state()
    if setup.main:
        write_checkpoint(config.output_dir, step, current, optimizer_state,
                         {"model": config.model, "world_size": setup.world, "config": config.to_dict()},
                         keep=config.keep_checkpoints)
    if setup.world > 1:
        dist.barrier()


def _training(model, plan: GoRAPlan, config: TrainConfig, setup: Setup, micro: int, accumulation: int,
              ds_stage: Optional[int]):
    """Put the plan's adapters into the model as loaded (still sharded by FSDP2 or partitioned by
    ZeRO-3 after estimation) and wrap it for training by the engine."""
    from gora_dist.launcher.training import DeepSpeedTraining, TorchTraining

    apply_plan(model, plan)
    if setup.engine == "fsdp2":  # already sharded; the adapters are replicated (see gora_dist.comm.replicated)
        return TorchTraining(model, model, config, setup.device, synced_generation=setup.world > 1, main=setup.main)
    if ds_stage is not None:
        ds_config = deepspeed_config(config, ds_stage, micro, accumulation, setup.world)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # DeepSpeed allocates its gradient bucket at reduce_bucket_size (default 5e8 elements, 2 GB in
        # float32) however few parameters train; the adapters need at most their own size
        ds_config["zero_optimization"].setdefault("reduce_bucket_size", max(1, min(int(5e8), trainable)))
        return DeepSpeedTraining(model, config, ds_config, synced_generation=ds_stage == 3 and setup.world > 1)
    if setup.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[setup.device] if setup.device.type == "cuda" else None)
        return TorchTraining(model, runner, config, setup.device, main=setup.main)
    return TorchTraining(model, model, config, setup.device)


def resolve_precision(config: TrainConfig) -> TrainConfig:
    """precision auto -> bf16 on GPUs, fp32 on the CPU; on GPUs float32 matmuls may use TF32."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.precision != "auto":
        return config
    return dataclasses.replace(config, precision="bf16" if torch.cuda.is_available() else "fp32")


def main(argv: Optional[List[str]] = None) -> int:
    arguments, by_deepspeed = _strip_launcher_arguments(sys.argv[1:] if argv is None else list(argv))
    config = resolve_precision(load_config(arguments))
    task = build_task(config, load_tokenizer(config.model))  # bad data fails here: no process group, nothing written
    setup = setup_distributed(config, by_deepspeed)
    try:
        run(config, setup, task)
    finally:
        write_memory_trace()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
