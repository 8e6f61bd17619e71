"""Which modules GoRA adapts (PEFT's name rule) and where a model's transformer blocks are."""

from __future__ import annotations

import re
from typing import Dict, Sequence

import torch.nn as nn

from gora_dist.model.quantized import unreadable_reason


def module_matches(name: str, target_modules) -> bool:
    """PEFT's rule: a list matches equal names or ``.entry`` suffixes; a string is a full-name regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def saved_modules(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Module]:
    """Modules matched by ``names`` (PEFT's modules_to_save: the same rule as a target list)."""
    names = list(names)
    found = {n: m for n, m in model.named_modules() if n and module_matches(n, names)}
    missing = [t for t in names if not any(module_matches(n, [t]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of this model")
    return found


def find_target_modules(model: nn.Module, target_modules) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to adapt (bitsandbytes' quantised ones included), by name, in module
    order; errors name what is wrong (another module type, a quantisation GoRA cannot read)."""
    from gora_dist.model.layers import GoRALinear  # layers builds on this module, not the other way

    found = {}
    for name, module in model.named_modules():
        if not name or not module_matches(name, target_modules):
            continue
        if isinstance(module, GoRALinear):
            raise ValueError(f"{name} already carries a GoRA adapter: apply_gora runs once per model")
        reason = unreadable_reason(name, module)
        if reason is not None:
            raise ValueError(reason)
        found[name] = module
    if not found:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise ValueError(
            f"no module matches target_modules={shown!r}; the model's nn.Linear modules are named {linear_names}"
        )
    return found


def transformer_blocks(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: block} for the modules whose class is in the model's ``_no_split_modules`` (HF), in order.
    The class hierarchy is searched because FSDP2 subclasses a sharded block (FSDPLlamaDecoderLayer)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    return {name: m for name, m in model.named_modules()
            if name and any(cls.__name__ in block_classes for cls in type(m).__mro__)}
