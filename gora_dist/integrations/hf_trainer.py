"""GoRA for a transformers ``Trainer`` (or an accelerate script) in a few lines:

    plan = prepare_gora(model, train_dataset, GoRAConfig(...), args=training_args, data_collator=collator)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()

``prepare_gora`` runs before the Trainer wraps the model: it estimates the plan with the engine that
matches the run (DeepSpeed ZeRO-3 when the model was loaded partitioned under an HF DeepSpeed
config, DDP when several processes run, one process otherwise) on this rank's share of
``grad_steps`` global batches, then puts the adapters in. The Trainer then builds its optimizer
over the adapters only, and DeepSpeed/FSDP shard them like any parameter.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..adapter_io import save_plan
from ..config import GoRAConfig
from ..gather import full_parameters
from ..plan import GoRAPlan, apply_plan


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _rank_batches(dataset, collator, global_batch: int, steps: int, seed: int):
    """This rank's slice of each of ``steps`` global batches drawn by a seeded permutation."""
    rank, world = _rank_world()
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world}")
    per_rank = global_batch // world
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    if len(order) < steps * global_batch:
        raise ValueError(f"the dataset has {len(order)} examples: too few for {steps} gradient steps of {global_batch}")
    for step in range(steps):
        chunk = order[step * global_batch:(step + 1) * global_batch][rank * per_rank:(rank + 1) * per_rank]
        yield collator([dataset[i] for i in chunk])


def _zero3_config(args) -> Optional[dict]:
    """The HF DeepSpeed config when the run uses ZeRO-3 (the model is then loaded partitioned)."""
    hf_config = getattr(args, "hf_deepspeed_config", None) if args is not None else None
    if hf_config is None or not hf_config.is_zero3():
        return None
    config = {key: value for key, value in hf_config.config.items() if value != "auto"}
    config["zero_optimization"] = {k: v for k, v in hf_config.config.get("zero_optimization", {}).items() if v != "auto"}
    for precision in ("bf16", "fp16"):
        if isinstance(config.get(precision), dict):
            config[precision] = {k: v for k, v in config[precision].items() if v != "auto"}
    return config


def prepare_gora(model: nn.Module, train_dataset, config: GoRAConfig, *, args=None, data_collator=None,
                 global_batch_size: Optional[int] = None, loss_fn=None, engine: str = "auto") -> GoRAPlan:
    """Estimate GoRA's plan on ``train_dataset`` and apply it to ``model`` (before ``Trainer(...)``).

    args: the TrainingArguments (batch size and DeepSpeed config come from them). The global batch
    is ``per_device_train_batch_size × world size`` unless ``global_batch_size`` is given.
    """
    from ..distributed import estimate_plan

    collator = data_collator
    if collator is None:
        from transformers import default_data_collator

        collator = default_data_collator
    rank, world = _rank_world()
    per_device = getattr(args, "per_device_train_batch_size", 8) if args is not None else 8
    global_batch = global_batch_size or per_device * world
    extra = {}
    if engine == "auto":
        ds_config = _zero3_config(args)
        if ds_config is not None or any(hasattr(p, "ds_id") for p in model.parameters()):
            engine, extra = "zero3", {"ds_config": ds_config or {"zero_optimization": {"stage": 3}}}
        else:
            engine = "ddp" if world > 1 else "local"
    seed = getattr(args, "seed", config.seed) if args is not None else config.seed
    batches = _rank_batches(train_dataset, collator, global_batch, config.grad_steps, seed)
    plan = estimate_plan(model, batches, config, engine=engine, loss_fn=loss_fn, **extra)
    apply_plan(model, plan)
    return plan


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
            current = GoRAPlan(self.plan.report, {n: a for n, (a, _) in adapters.items()},
                               {n: b for n, (_, b) in adapters.items()})
            save_plan(current, os.path.join(folder, self.subfolder), model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir)
