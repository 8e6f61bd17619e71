"""GoRA for a transformers ``Trainer``, TRL's ``SFTTrainer`` or an accelerate loop, in a few lines:

    plan = prepare_gora(model, train_dataset, GoRAConfig(...), args=training_args, data_collator=collator)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()

or, for a PEFT model (everything PEFT and the trainers' PEFT support offer; not under a Trainer's
own FSDP2, see prepare_gora_peft):

    model, plan = prepare_gora_peft(model, train_dataset, GoRAConfig(...), args=training_args)

Both run after the process group exists and before the trainer wraps the model. They estimate the
plan with the engine the run uses, on this rank's share of ``grad_steps`` global batches:
DeepSpeed ZeRO-3 when the model was loaded partitioned (an HF DeepSpeed config at stage 3), FSDP2
when the arguments or the accelerator ask for FSDP2 on accelerator devices (the model is
``fully_shard``-ed here, the way accelerate would, which then takes it as it is), DDP when several
processes run (FSDP asked for on the CPU included: accelerate trains with DDP there), one process
otherwise. ``plan_from`` reads a saved plan instead (resuming a checkpoint: the same rank
map, no second estimation).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from gora_dist.comm.gather import full_parameters
from gora_dist.config import GoRAConfig
from gora_dist.engines.choice import choose_engine
from gora_dist.integrations.run_sharding import fsdp_version, on_cpu, shard_fsdp2, zero3_config
from gora_dist.model.adapter_io import load_plan, save_plan
from gora_dist.pipeline.apply import apply_plan
from gora_dist.pipeline.batches import global_batch_indices, rank_micro_batches
from gora_dist.report import GoRAPlan


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _rank_batches(dataset, collator, global_batch: int, steps: int, seed: int):
    """This rank's share of each of ``steps`` global batches (the launcher's draw and split)."""
    rank, world = _rank_world()
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world}")
    if len(dataset) < global_batch:
        raise ValueError(f"the dataset has {len(dataset)} examples: too few for a global batch of {global_batch}")
    draws = global_batch_indices(len(dataset), global_batch, seed, stream=1)
    for _ in range(steps):
        (share,) = rank_micro_batches(next(draws), rank, world, global_batch // world)
        yield collator([dataset[i] for i in share])


def _estimate(model, train_dataset, config: GoRAConfig, *, args, accelerator, data_collator, global_batch_size,
              loss_fn, engine: str, plan_from: Optional[str]) -> GoRAPlan:
    """The plan estimated under the run's engine, or read from ``plan_from``; the model is left
    sharded as the engine holds it."""
    from gora_dist.pipeline.sharded import estimate_plan

    world = _rank_world()[1]
    extra = {}
    if engine == "auto":
        ds_config = zero3_config(args)
        zero3 = ds_config is not None or any(hasattr(p, "ds_id") for p in model.parameters())
        engine, warning = choose_engine(zero3=zero3, fsdp=fsdp_version(args, accelerator), world=world,
                                        cpu=on_cpu(args, accelerator))
        if warning:
            warnings.warn(warning, stacklevel=3)
        if zero3:
            extra = {"ds_config": ds_config or {"zero_optimization": {"stage": 3}}}
    if engine == "fsdp2":
        shard_fsdp2(model, args, accelerator)
    if plan_from is not None:
        plan = load_plan(plan_from)
        if plan.report.config.target_modules != config.target_modules:
            raise ValueError(f"plan_from={plan_from}: its plan targets {plan.report.config.target_modules}, "
                             f"this run's config {config.target_modules}")
        return plan
    collator = data_collator
    if collator is None:
        from transformers import default_data_collator

        collator = default_data_collator
    per_device = getattr(args, "per_device_train_batch_size", 8) if args is not None else 8
    global_batch = global_batch_size or per_device * world
    seed = getattr(args, "seed", config.seed) if args is not None else config.seed
    batches = _rank_batches(train_dataset, collator, global_batch, config.grad_steps, seed)
    return estimate_plan(model, batches, config, engine=engine, loss_fn=loss_fn, **extra)


def prepare_gora(model: nn.Module, train_dataset, config: GoRAConfig, *, args=None, data_collator=None,
                 global_batch_size: Optional[int] = None, loss_fn=None, engine: str = "auto", accelerator=None,
                 plan_from: Optional[str] = None) -> GoRAPlan:
    """Estimate GoRA's plan on ``train_dataset`` and put GoRA's layers into ``model`` (before
    ``Trainer(...)`` or ``accelerator.prepare``); returns the plan.

    args: the TrainingArguments (batch size, seed, DeepSpeed/FSDP settings come from them);
    accelerator: an Accelerator, for accelerate loops. The global batch is
    ``per_device_train_batch_size × world size`` unless ``global_batch_size`` is given. engine:
    ``auto`` (the run's, see the module docstring), or ``zero3``/``fsdp2``/``ddp``/``local``.
    plan_from: an adapter folder with its gora.json (a checkpoint's ``gora_adapter``) to resume from.
    """
    plan = _estimate(model, train_dataset, config, args=args, accelerator=accelerator, data_collator=data_collator,
                     global_batch_size=global_batch_size, loss_fn=loss_fn, engine=engine, plan_from=plan_from)
    apply_plan(model, plan)
    return plan


def prepare_gora_peft(model: nn.Module, train_dataset, config: GoRAConfig, *, args=None, data_collator=None,
                      global_batch_size: Optional[int] = None, loss_fn=None, engine: str = "auto", accelerator=None,
                      plan_from: Optional[str] = None, adapter_name: str = "default"):
    """As :func:`prepare_gora`, but returns ``(peft_model, plan)``: a PEFT LoRA model holding the plan
    (``gora_dist.to_peft``), for the trainers' PEFT support (adapter-only checkpoints, TRL).

    Under FSDP2 the adapters stay replicated beside the weight shards, their gradients averaged at
    each backward, which suits your own loop (``engine="fsdp2"``). A Trainer or accelerate run that
    asks for FSDP2 itself is refused: accelerate would shard the PEFT wrapper a second time (it takes
    a model as it is only when the model is ``fully_shard``-ed at the top); use :func:`prepare_gora`,
    whose model accelerate takes as it is.
    """
    from gora_dist.model.peft_model import to_peft

    if engine == "auto" and fsdp_version(args, accelerator) == 2 and _rank_world()[1] > 1 \
            and not on_cpu(args, accelerator):
        raise ValueError("prepare_gora_peft under a Trainer/accelerate FSDP2 run: accelerate would shard the PEFT "
                         "model a second time; use prepare_gora (GoRA's layers) there, or engine='fsdp2' with your "
                         "own training loop")
    plan = _estimate(model, train_dataset, config, args=args, accelerator=accelerator, data_collator=data_collator,
                     global_batch_size=global_batch_size, loss_fn=loss_fn, engine=engine, plan_from=plan_from)
    return to_peft(model, plan, adapter_name=adapter_name), plan


def gather_adapters(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Full (A, B) of every adapter on every rank, whether plain, FSDP2 DTensors or ZeRO-3 partitioned.
    A collective when sharded: every rank must call it."""
    tensors = full_parameters(model, lambda name: ".lora_A" in name or ".lora_B" in name)
    prefix = "module."  # a DDP wrapper's parameter names
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
    return {m[len(prefix):] if m.startswith(prefix) else m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"])
            for m in modules}


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class GoRAAdapterSaver(_trainer_callback_base()):
    """Writes the adapters in PEFT format (+ gora.json) into each Trainer checkpoint folder
    (``checkpoint-N/gora_adapter``) and into ``output_dir/gora_adapter`` at the end of training."""

    def __init__(self, plan: GoRAPlan, subfolder: str = "gora_adapter") -> None:
        self.plan, self.subfolder = plan, subfolder

    def _write(self, model, folder: str) -> None:
        adapters = gather_adapters(model)
        if _rank_world()[0] == 0:
            current = GoRAPlan.from_adapters(self.plan.report, adapters)
            save_plan(current, os.path.join(folder, self.subfolder), model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir)
