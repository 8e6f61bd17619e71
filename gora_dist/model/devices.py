"""Where a model and its batches live, and how much memory is left there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn as nn


def to_device(batch, device: torch.device):
    """A dict batch with its tensors on ``device`` (other values, e.g. ``num_items_in_batch``, as they
    are); anything else is returned as it is, for ``loss_fn`` to place."""
    if isinstance(batch, Mapping):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return batch


def model_device(model: nn.Module) -> Optional[torch.device]:
    param = next(model.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


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
