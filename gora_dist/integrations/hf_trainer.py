"""GoRA for a transformers ``Trainer``, TRL's ``SFTTrainer`` or an accelerate loop, in a few lines:

    plan = prepare_gora(model, train_dataset, GoRAConfig(...), args=training_args, data_collator=collator)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()

or, for a PEFT model (everything PEFT and the trainers' PEFT support offer; under a Trainer's own
FSDP2 use prepare_trainer, see prepare_gora_peft):

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

from typing import Optional

import torch.nn as nn

from gora_dist.config import GoRAConfig
from gora_dist.integrations.run_plan import plan_for_run, rank_and_world, run_engine
from gora_dist.integrations.run_sharding import fsdp_version, on_cpu
from gora_dist.pipeline.apply import apply_plan
from gora_dist.pipeline.batches import global_batch_indices, rank_micro_batches
from gora_dist.report import GoRAPlan


def _rank_batches(dataset, collator, global_batch: int, steps: int, seed: int):
    """This rank's share of each of ``steps`` global batches (the launcher's draw and split)."""
    rank, world = rank_and_world()
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
    """The plan on ``train_dataset``'s global batches under the run's engine, or read from ``plan_from``."""
    engine, extra = run_engine(model, args=args, accelerator=accelerator, engine=engine)
    batches = None
    if plan_from is None:
        collator = data_collator
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        world = rank_and_world()[1]
        per_device = getattr(args, "per_device_train_batch_size", 8) if args is not None else 8
        global_batch = global_batch_size or per_device * world
        seed = getattr(args, "seed", config.seed) if args is not None else config.seed
        batches = _rank_batches(train_dataset, collator, global_batch, config.grad_steps, seed)
    return plan_for_run(model, batches, config, args=args, accelerator=accelerator, engine=engine, extra=extra,
                        loss_fn=loss_fn, plan_from=plan_from)


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
    asks for FSDP2 itself is refused here: the base is sharded and run before the PEFT wrapper
    exists, and accelerate takes a model as it is only when its top is ``fully_shard``-ed, so it would
    shard the wrapper a second time. ``prepare_trainer(trainer)`` does that case: it makes the
    PeftModel the FSDP2 root before estimating.
    """
    from gora_dist.model.peft_model import to_peft

    if engine == "auto" and fsdp_version(args, accelerator) == 2 and rank_and_world()[1] > 1 \
            and not on_cpu(args, accelerator):
        raise ValueError("prepare_gora_peft under a Trainer/accelerate FSDP2 run: accelerate would shard the PEFT "
                         "model a second time; build the Trainer first (with peft_config or the PeftModel) and call "
                         "gora_dist.integrations.prepare_trainer(trainer), or use prepare_gora (GoRA's layers), or "
                         "engine='fsdp2' with your own training loop")
    plan = _estimate(model, train_dataset, config, args=args, accelerator=accelerator, data_collator=data_collator,
                     global_batch_size=global_batch_size, loss_fn=loss_fn, engine=engine, plan_from=plan_from)
    return to_peft(model, plan, adapter_name=adapter_name), plan
