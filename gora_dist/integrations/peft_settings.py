"""GoRA's options read from the PEFT model a trainer already holds (TRL's ``peft_config``, or a
``PeftModel`` passed in): the layers it adapts, ``r`` as the reference rank, ``lora_alpha``,
``lora_dropout``. A ``LoraConfig`` that asks for something GoRA cannot give is refused by field,
before anything is estimated."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from gora_dist.config import GoRAConfig

RANK_SPREAD = (0.5, 4.0)
"""Ranks GoRA may give a layer, as multiples of LoRA's ``r``: [r/2, 4r], the paper's [4, 32] at r = 8."""

_UNEXPRESSIBLE = {  # LoraConfig field -> (the value GoRA can honour, why another one cannot be)
    "use_dora": (False, "DoRA adds a magnitude vector GoRA does not initialise"),
    "rank_pattern": ({}, "GoRA chooses each layer's rank itself"),
    "alpha_pattern": ({}, "GoRA scales every layer by alpha/sqrt(rank)"),
    "layers_to_transform": (None, "name the layers in target_modules instead"),
    "layers_pattern": (None, "name the layers in target_modules instead"),
    "bias": ("none", "GoRA adapts weights only"),
    "lora_bias": (False, "GoRA adapts weights only"),
    "fan_in_fan_out": (False, "GoRA adapts nn.Linear layers (not Conv1D)"),
    "use_qalora": (False, "QA-LoRA pools the input, GoRA's B0 assumes it does not"),
    "layer_replication": (None, "replicated layers share weights GoRA would score twice"),
}
_INITIALISATIONS = (True, "gaussian")
"""init_lora_weights GoRA may replace with its own A0/B0 (the others are initialisations of their own)."""


def lora_settings(peft_model) -> Tuple[str, object]:
    """(adapter name, LoraConfig) of the one LoRA adapter in ``peft_model``; refuses several."""
    configs = dict(getattr(peft_model, "peft_config", {}) or {})
    if len(configs) != 1:
        raise ValueError(f"the PEFT model holds adapters {sorted(configs)}: GoRA plans one, pass a model with one adapter")
    (name, config), = configs.items()
    if type(config).__name__ != "LoraConfig":
        raise ValueError(f"the PEFT model's adapter {name!r} is a {type(config).__name__}: GoRA plans LoRA adapters")
    return name, config


def check_expressible(config) -> None:
    """Raise naming the first LoraConfig field GoRA cannot honour."""
    for field_name, (usable, why) in _UNEXPRESSIBLE.items():
        value = getattr(config, field_name, usable)
        if value != usable and not (usable in ({}, None, False) and not value):
            raise ValueError(f"LoraConfig.{field_name}={value!r}: GoRA cannot express it ({why}); "
                             f"set {field_name}={usable!r} or pass config=GoRAConfig(...)")
    if getattr(config, "target_parameters", None):
        raise ValueError(f"LoraConfig.target_parameters={config.target_parameters!r}: GoRA adapts whole nn.Linear "
                         "modules; name them in target_modules")
    if getattr(config, "exclude_modules", None):
        raise ValueError(f"LoraConfig.exclude_modules={config.exclude_modules!r}: GoRA takes the adapted layers by "
                         "name; leave exclude_modules empty and narrow target_modules")
    init = getattr(config, "init_lora_weights", True)
    if init not in _INITIALISATIONS:
        hint = (" For PiSSA or LoRA-GA keep init_lora_weights=True and call prepare_trainer(trainer, "
                "initializer='pissa' or 'lora_ga'): GoRA runs them sharded, PEFT's own would already have rewritten "
                "the base") if str(init).lower().startswith(("pissa", "lora_ga")) else ""
        raise ValueError(f"LoraConfig.init_lora_weights={init!r}: GoRA initialises the adapters itself (A0, B0); "
                         f"use True or 'gaussian'.{hint}")


def adapted_layers(peft_model, adapter_name: str) -> List[str]:
    """Names (in the base model) of the layers carrying the adapter: PEFT's own resolution of
    ``target_modules`` (suffixes, regex, ``all-linear``, the model type's defaults)."""
    inner = peft_model.base_model.model
    names = [name for name, module in inner.named_modules()
             if adapter_name in getattr(module, "lora_A", {}) and hasattr(module, "base_layer")]
    if not names:
        raise ValueError(f"the PEFT model's adapter {adapter_name!r} adapts no layer")
    for name in names:
        base = inner.get_submodule(name).base_layer
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoraConfig.target_modules reaches {name}, a {type(base).__name__}: GoRA adapts "
                             "nn.Linear layers only")
    return names


def adapter_dtype(peft_model, adapter_name: str):
    """The dtype the PEFT model's adapter ``adapter_name`` is kept in (TRL casts QLoRA adapters to
    bfloat16), or None when its layers disagree: the dtype the plan's adapters are then put in."""
    dtypes = {param.dtype for name, param in peft_model.named_parameters()
              if (f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name)}
    return dtypes.pop() if len(dtypes) == 1 else None


def short_targets(names: List[str], all_linear: Dict[str, nn.Module]) -> List[str]:
    """The layers as PEFT-style suffixes (``q_proj``) when those select exactly ``names`` among the
    model's linear layers ``all_linear``, else the full names: gora.json stays readable."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    chosen = [name for name in all_linear if name.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(chosen) == sorted(names) else list(names)


def gora_config_from_lora(config, target_modules, *, seed: int = 0, grad_steps: Optional[int] = None) -> GoRAConfig:
    """GoRA's options for a LoraConfig: its layers, ``r`` as rank_ref with ranks in [r/2, 4r],
    ``lora_alpha``, ``lora_dropout``; GoRA's paper defaults otherwise (rsLoRA scaling, γ)."""
    check_expressible(config)
    r = int(config.r)
    values = dict(target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
                  rank_ref=r, rank_min=max(1, int(r * RANK_SPREAD[0])), rank_max=max(1, int(r * RANK_SPREAD[1])),
                  alpha=float(config.lora_alpha), dropout=float(config.lora_dropout or 0.0), seed=seed,
                  modules_to_save=tuple(config.modules_to_save or ()))
    if grad_steps is not None:
        values["grad_steps"] = grad_steps
    return GoRAConfig(**values)


