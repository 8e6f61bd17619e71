"""GoRA in a ``transformers.Trainer`` or TRL script with one call, after the trainer is built and
before ``trainer.train()``:

    trainer = SFTTrainer(model="path/to/model", args=SFTConfig(...), train_dataset=data,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    prepare_trainer(trainer)
    trainer.train()

GoRA estimates on the trainer's own batches with the trainer's own loss (``trainer_batches``), under
the engine the trainer trains with (``run_plan``). With a PEFT model in the trainer its LoraConfig is
the budget and the trainer keeps that same ``PeftModel``, now holding the plan's ranks and A0/B0;
without one GoRA's own layers go in. The plan is written into every checkpoint, and a run resumed
from one (``args.resume_from_checkpoint``, as TRL's ``sft.py`` passes it) reads it back.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch.nn as nn

from gora_dist.config import GoRAConfig
from gora_dist.integrations.adapter_saver import SUBFOLDER, GoRAAdapterSaver
from gora_dist.integrations.peft_settings import (adapted_layers, adapter_dtype, check_expressible, gora_config_from_lora,
                                                  lora_settings, short_targets)
from gora_dist.integrations.run_plan import plan_for_run, run_engine
from gora_dist.integrations.trainer_batches import (check_enough_batches, micro_batches_per_step, trainer_loss,
                                                    trainer_micro_batches, trainer_state_kept)
from gora_dist.model.adapter_io import peft_adapter_folder
from gora_dist.model.layers import GoRALinear
from gora_dist.model.targets import find_target_modules
from gora_dist.pipeline.apply import apply_plan
from gora_dist.report import GoRAPlan


def prepare_trainer(trainer, config: Optional[GoRAConfig] = None, *, plan_from: Optional[str] = None,
                    engine: str = "auto", as_peft: bool = False, **options) -> GoRAPlan:
    """Estimate GoRA's plan for ``trainer`` and put it into the trainer's model; returns the plan.

    config: GoRA's options; None takes them from the trainer's PEFT LoraConfig (its layers, ``r`` as
    the reference rank with ranks in [r/2, 4r], ``lora_alpha``, ``lora_dropout``, ``args.seed``).
    ``config.grad_steps`` counts optimizer steps (each of ``gradient_accumulation_steps`` micro-batches).
    plan_from: an adapter folder with gora.json to use instead of estimating; by default a run
    resumed from a checkpoint (``args.resume_from_checkpoint``) reads the plan saved there.
    engine: ``auto`` (the trainer's), or ``zero3``/``fsdp2``/``ddp``/``local``.
    as_peft: without a PEFT model in the trainer, put in a ``PeftModel`` (instead of GoRA's layers).
    options: GoRAConfig fields that replace the config's (or the LoraConfig's), e.g.
    ``initializer="pissa"``, ``allocator="uniform"``, ``grad_steps=16``.

    With ``initializer`` ``lora_ga`` or ``pissa`` each rank offsets its own part of the base, and every
    adapter the trainer or PEFT saves is the rank-2r one for the original base (``model/peft_offset``).
    """
    _refuse_started(trainer)
    model = trainer.model
    peft = _is_peft_model(model)
    dtype = None
    if config is None and not peft:
        raise ValueError("prepare_trainer: the trainer holds no PEFT model to take GoRA's settings from; pass "
                         "config=GoRAConfig(target_modules=[...], ...) or give the trainer a peft_config")
    if peft:
        adapter_name, lora = lora_settings(model)
        check_expressible(lora)
        layers = adapted_layers(model, adapter_name)
        dtype = adapter_dtype(model, adapter_name)  # the plan's adapters are kept in it (TRL: bf16 for QLoRA)
        if config is None:
            config = gora_config_from_lora(lora, short_targets(layers, _linear_layers(model)), seed=trainer.args.seed)
    config = with_options(config, options)
    _check_targets(model, config.target_modules, peft)
    per_step = micro_batches_per_step(trainer)
    if config.adaptive_grad_steps and per_step > 1:
        raise ValueError(f"adaptive_grad_steps counts backward passes; with gradient_accumulation_steps={per_step} it "
                         "could stop inside an optimizer step: turn it off")
    plan_from = plan_from if plan_from is not None else resumed_plan_folder(trainer.args, adapter_name if peft else None)
    loader = None
    if plan_from is None:
        loader = trainer.get_train_dataloader()
        check_enough_batches(loader, config.grad_steps, per_step)

    if as_peft and not peft:  # an empty PeftModel first, so the trainer's root stays the PEFT wrapper
        model = _empty_peft_model(model, config)
        adapter_name, peft = "default", True
    base = model.unload() if peft else model
    engine, extra = run_engine(base, args=trainer.args, accelerator=trainer.accelerator, engine=engine)
    forward_model = None
    if engine == "fsdp2" and peft:
        forward_model = _shard_peft_root(model, base, trainer)  # the PeftModel is the FSDP2 root, as accelerate makes it
    estimated = dataclasses.replace(config, grad_steps=config.grad_steps * per_step)  # backward passes
    with trainer_state_kept(trainer):
        batches = None if loader is None else trainer_micro_batches(trainer, loader, config.grad_steps)
        loss = trainer_loss(trainer)
        loss_fn = loss if forward_model is None else (lambda _engine_model, batch: loss(forward_model, batch))
        plan = plan_for_run(base, batches, estimated, args=trainer.args, accelerator=trainer.accelerator,
                            engine=engine, extra=extra, loss_fn=loss_fn, plan_from=plan_from)
    if peft:
        from gora_dist.model.peft_model import plan_into_peft

        plan_into_peft(model, plan, adapter_name=adapter_name, dtype=dtype)
    else:
        apply_plan(model, plan)
    _hand_to_trainer(trainer, model)
    trainer.add_callback(GoRAAdapterSaver(plan))
    if trainer.args.should_log:
        trainer.accelerator.print(plan_summary(plan, engine, estimated=loader is not None))
    return plan


def with_options(config: GoRAConfig, options: dict) -> GoRAConfig:
    """``config`` with the given fields replaced (checked as any GoRAConfig); an unknown name is refused
    with the fields there are."""
    known = {field.name for field in dataclasses.fields(GoRAConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"prepare_trainer: {unknown} are not GoRAConfig fields; they are {sorted(known)}")
    return dataclasses.replace(config, **options) if options else config


def plan_summary(plan: GoRAPlan, engine: str, *, estimated: bool) -> str:
    """One line for the run's log: the ranks, the budget, and what the plan cost (or where it came from)."""
    report = plan.report
    ranks = list(plan.rank_map.values())
    head = (f"GoRA: {len(ranks)} layers, ranks {min(ranks)}-{max(ranks)}, {report.param_count:,d} adapter parameters "
            f"({report.param_count / max(report.param_budget, 1):.1%} of LoRA at r={report.config.rank_ref})")
    if not estimated:
        return head + "; the plan saved in the checkpoint (not estimated again)"
    timings = report.timings
    return (head + f"; estimated under {engine} from {report.grad_steps} backward passes in "
            f"{timings.get('gradient_s', 0.0):.1f} s, ranks and A0/B0 in {timings.get('init_s', 0.0):.1f} s")


def resumed_plan_folder(args, adapter_name: Optional[str] = None) -> Optional[str]:
    """The plan saved in the checkpoint a run resumes from (``resume_from_checkpoint``: a folder, or
    true for the last one in ``output_dir``): gora.json beside the PEFT adapter ``adapter_name``, or in
    ``gora_adapter/``; None for a fresh run."""
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume is None or resume is False or str(resume).strip().lower() in ("", "false", "none"):
        return None
    checkpoint = resume
    if resume is True or str(resume).strip().lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True: no checkpoint-N folder in {args.output_dir}")
    # beside the Trainer's own PEFT adapter, then GoRA's layers' folder
    places = [peft_adapter_folder(checkpoint, adapter_name), os.path.join(checkpoint, SUBFOLDER)]
    for folder in places:
        if os.path.isfile(os.path.join(folder, "gora.json")):
            return folder
    raise ValueError(f"resume_from_checkpoint={checkpoint}: no gora.json there (nor in {SUBFOLDER}/), so no GoRA plan "
                     "to resume (prepare_trainer writes it into each checkpoint); pass plan_from= an adapter folder "
                     "with gora.json")


def _refuse_started(trainer) -> None:
    state = getattr(trainer, "state", None)
    if state is not None and getattr(state, "global_step", 0) > 0:
        raise ValueError(f"prepare_trainer: the trainer has trained {state.global_step} steps already; call it after "
                         "building the trainer and before trainer.train()")
    if getattr(trainer, "model_wrapped", trainer.model) is not trainer.model or getattr(trainer.accelerator, "_models", []):
        raise ValueError("prepare_trainer: the trainer's model is wrapped for training already (DeepSpeed, DDP or FSDP); "
                         "call it before trainer.train()")
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError("prepare_trainer: the trainer was given an optimizer, which holds the parameters GoRA is about "
                         "to replace; let the trainer build it (optimizers=(None, None)) or use optimizer_cls_and_kwargs")
    if any(isinstance(module, GoRALinear) for module in trainer.model.modules()):
        raise ValueError("prepare_trainer: the trainer's model has GoRA layers already; call it once per trainer")
    if type(trainer.model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"):
        raise ValueError(f"prepare_trainer: the trainer holds a {type(trainer.model).__name__}; give the trainer the "
                         "model as loaded")


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_targets(model: nn.Module, target_modules, peft: bool) -> None:
    """Raise, naming the model's linear layers, when ``target_modules`` selects none (or selects
    something that is not a linear layer), before the model is touched."""
    if not peft:
        find_target_modules(model, target_modules)
        return
    from gora_dist.model.targets import module_matches

    linear = _linear_layers(model)
    if not any(module_matches(name, target_modules) for name in linear):
        short = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"no module matches target_modules={target_modules!r}; the model's nn.Linear modules are "
                         f"named {short}")


def _linear_layers(peft_model) -> dict:
    """{name: module} of every linear layer of the base model inside ``peft_model`` (a LoRA-wrapped
    layer counted once, by its own name)."""
    inner = peft_model.base_model.model
    found = {}
    for name, module in inner.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, nn.Linear):
            found[name] = layer
    return found


def _empty_peft_model(model: nn.Module, config: GoRAConfig):
    """A ``PeftModel`` around ``model`` whose adapter is then unloaded: the wrapper the plan goes into."""
    from peft import LoraConfig, get_peft_model

    from gora_dist.model.adapter_io import peft_task_type

    placeholder = LoraConfig(r=1, target_modules=config.target_modules, task_type=peft_task_type(model))
    return get_peft_model(model, placeholder)


def _shard_peft_root(peft_model, base: nn.Module, trainer):
    """FSDP2: the base's blocks, embeddings and root sharded as the run would, then the PEFT wrapper as
    the root over them, before any forward; accelerate takes an FSDP2 root as it is. Returns the
    module the estimation's forward goes through (the root)."""
    from torch.distributed.fsdp import fully_shard

    from gora_dist.integrations.run_sharding import fsdp2_policy, shard_fsdp2

    shard_fsdp2(base, trainer.args, trainer.accelerator)
    mesh = next(p.device_mesh for p in base.parameters() if hasattr(p, "device_mesh"))
    fully_shard(peft_model, mesh=mesh, mp_policy=fsdp2_policy(trainer.args, trainer.accelerator))
    return peft_model


def _hand_to_trainer(trainer, model: nn.Module) -> None:
    """The trainer, its callbacks and its training loop see ``model`` (the same object unless a new
    PEFT wrapper was made)."""
    if trainer.model is not model:
        trainer.model = model
        trainer.model_wrapped = model
        trainer.callback_handler.model = model
