"""Model-facing helpers shared by every engine: which modules are targets, a batch's loss, devices."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .layers import GoRALinear

LossFn = Callable[[nn.Module, object], torch.Tensor]


def module_matches(name: str, target_modules) -> bool:
    """PEFT's rule: a list matches equal names or ``.entry`` suffixes; a string is a full-name regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_target_modules(model: nn.Module, target_modules) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to adapt, by name, in module order; errors name what is wrong."""
    found = {}
    for name, module in model.named_modules():
        if not name or not module_matches(name, target_modules):
            continue
        if isinstance(module, GoRALinear):
            raise ValueError(f"{name} already carries a GoRA adapter: apply_gora runs once per model")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name} matches target_modules but is a {type(module).__name__}; GoRA adapts nn.Linear layers only"
            )
        found[name] = module
    if not found:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise ValueError(
            f"no module matches target_modules={shown!r}; the model's nn.Linear modules are named {linear_names}"
        )
    return found


def batch_loss(model: nn.Module, batch, loss_fn: Optional[LossFn], where: str, require_finite: bool = True):
    """The scalar loss of one batch: ``loss_fn(model, batch)`` or ``model(**batch).loss``."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise ValueError(f"{where}: batch is a {type(batch).__name__}; pass dicts of model inputs, or loss_fn=")
        output = model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"{where}: the model returned no loss; include labels in the batch or pass loss_fn=")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{where}: the loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    if require_finite and not torch.isfinite(loss.detach()).all():
        raise ValueError(f"{where}: the loss is {loss.item()} (not finite)")
    return loss


def to_device(batch, device: torch.device):
    """Move the tensors of a dict batch to the model's device; anything else is left to loss_fn."""
    if isinstance(batch, Mapping):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return batch


def model_device(model: nn.Module) -> Optional[torch.device]:
    param = next(model.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


def transformer_blocks(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: block} for the modules whose class is in the model's ``_no_split_modules`` (HF), in order.
    The class hierarchy is searched because FSDP2 subclasses a sharded block (FSDPLlamaDecoderLayer)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    return {name: m for name, m in model.named_modules()
            if name and any(cls.__name__ in block_classes for cls in type(m).__mro__)}


def free_memory_bytes(device: Optional[torch.device]) -> int:
    """Memory that can still be allocated: free memory of a CUDA device, else the system's
    MemAvailable (Linux), else unlimited."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62
