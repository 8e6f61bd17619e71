"""A GoRA plan as a PEFT LoRA model: after ``to_peft`` GoRA is out of the way and everything PEFT
offers works (``save_pretrained``, ``merge_and_unload``, several adapters, the Trainer's and TRL's
PEFT support).

The model computes what ``apply_plan(model, plan)`` computes: PEFT's ``lora_A``/``lora_B`` hold the
plan's A0 (r, in) and B0 (out, r), in float32 like GoRA's own layers; ``rank_pattern`` gives each
layer its rank and ``use_rslora`` the scale α/√r. Nothing of the base model is gathered or copied:
the cost is the adapters themselves (float32, on every rank: PEFT creates them as plain tensors; under
ZeRO-3 ``deepspeed.initialize`` partitions them afterwards; under FSDP2 they stay replicated and
their gradients are averaged over the ranks once per backward, as with ``apply_plan``).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from gora_dist.comm.gather import write_full
from gora_dist.comm.replicated import average_beside_shards
from gora_dist.config import OFFSET_INITIALIZERS
from gora_dist.model.base_offset import check_offset_bases, offset_base
from gora_dist.model.layers import GoRALinear, check_adapters_fit
from gora_dist.model.peft_offset import keep_original_base_files


def lora_config(plan, *, task_type: Optional[str] = None, inference_mode: bool = False):
    """PEFT's ``LoraConfig`` for the plan's layers: their exact names as targets, each one's rank in
    ``rank_pattern`` (names escaped: PEFT reads the keys as regexes), rsLoRA, GoRA's α and dropout."""
    from peft import LoraConfig

    config = plan.report.config
    ranks = {name: lora_a.shape[0] for name, lora_a in plan.lora_a.items()}
    if not ranks:
        raise ValueError("the plan adapts no layer (every rank is 0): nothing to put into a PEFT model")
    return LoraConfig(
        r=max(ranks.values()), lora_alpha=config.alpha, use_rslora=config.use_rslora, lora_dropout=config.dropout,
        target_modules=list(ranks), rank_pattern={re.escape(name): rank for name, rank in ranks.items()},
        bias="none", modules_to_save=list(config.modules_to_save) or None, task_type=task_type,
        inference_mode=inference_mode,
    )


def _sharding(model: nn.Module) -> Optional[str]:
    for param in model.parameters():
        if hasattr(param, "device_mesh"):
            return "fsdp2"
        if hasattr(param, "ds_id"):
            return "zero3"
    return None


def to_peft(model: nn.Module, plan, *, adapter_name: str = "default", task_type: Optional[str] = None):
    """``peft.PeftModel`` of ``model`` (as loaded: plain, ZeRO-3 partitioned or FSDP2 sharded, with no
    GoRA layer in it) whose adapter ``adapter_name`` holds the plan's A0/B0.

    task_type: PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); default from the model's class. Every
    planned layer is checked (present, an ``nn.Linear``, the plan's shapes) before the model is touched.
    """
    from peft import get_peft_model

    from gora_dist.model.adapter_io import peft_task_type

    _check_fits(model, plan)
    config = lora_config(plan, task_type=task_type if task_type is not None else peft_task_type(model))
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _write_plan(peft_model, model, plan, adapter_name)
    return peft_model


def plan_into_peft(peft_model, plan, *, adapter_name: str = "default", dtype: Optional[torch.dtype] = None) -> None:
    """Put the plan into a ``PeftModel`` in place, as adapter ``adapter_name``: the model a trainer
    already holds (its LoRA layers unloaded first, ``peft_model.unload()``), so every reference the
    trainer keeps to it stays valid. The adapter's LoraConfig becomes the plan's. dtype: the
    adapters' (default PEFT's float32), e.g. the bfloat16 TRL keeps QLoRA adapters in."""
    base = peft_model.base_model.model
    _check_fits(base, plan)
    old = peft_model.peft_config[adapter_name]
    peft_model.peft_config[adapter_name] = lora_config(plan, task_type=old.task_type)
    peft_model.base_model.inject_adapter(base, adapter_name)
    peft_model.set_adapter(adapter_name)
    if dtype is not None:
        for name in plan.lora_a:
            layer = base.get_submodule(name)
            layer.lora_A[adapter_name].to(dtype)
            layer.lora_B[adapter_name].to(dtype)
    _write_plan(peft_model, base, plan, adapter_name)


def _check_fits(model: nn.Module, plan) -> None:
    if any(isinstance(module, GoRALinear) for module in model.modules()):
        raise ValueError("the model already has GoRA layers: pass it as loaded (to_peft adds PEFT's own layers)")
    weights = {name: (plan.lora_a[name], plan.lora_b[name]) for name in plan.lora_a}
    check_adapters_fit(model, weights)
    if plan.report.config.initializer in OFFSET_INITIALIZERS:
        check_offset_bases(model, weights, plan.report.config.initializer)
    sharding = _sharding(model)
    if plan.saved_state and sharding is not None:
        raise ValueError(f"modules_to_save={list(plan.report.config.modules_to_save)} with a {sharding}-sharded model: "
                         "PEFT would copy the sharded module; to_peft supports them on an unsharded model only")


def _write_plan(peft_model, model: nn.Module, plan, adapter_name: str) -> None:
    """A0/B0 (and the saved modules) into PEFT's layers; under FSDP2 the replicated adapters'
    gradients averaged once per backward. LoRA-GA / PiSSA: each rank offsets its own part of each
    base weight by s·B0·A0, and the model's adapter files are written for the original base."""
    inner = peft_model.base_model.model
    offset = plan.report.config.initializer in OFFSET_INITIALIZERS
    lora_params = []
    for name in plan.lora_a:
        layer = inner.get_submodule(name)
        for module, value in ((layer.lora_A[adapter_name], plan.lora_a[name]), (layer.lora_B[adapter_name], plan.lora_b[name])):
            write_full(module.weight, value)
            lora_params.append(module.weight)
        if offset:
            initial_a, initial_b = plan.initial(name)
            offset_base(layer.get_base_layer().weight, initial_a, initial_b, layer.scaling[adapter_name], name)
    if offset:
        keep_original_base_files(peft_model, adapter_name, plan)
    for key, value in plan.saved_state.items():  # modules_to_save: PEFT's trainable copy of each
        module_name, param_name = key.rsplit(".", 1)
        wrapper = inner.get_submodule(module_name)
        write_full(getattr(wrapper.modules_to_save[adapter_name], param_name), value)
    average_beside_shards(model, lora_params)


__all__ = ["to_peft", "plan_into_peft", "lora_config"]
