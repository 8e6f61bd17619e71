"""Where the Triton kernels may run, and the one switch that turns them off (no triton import here).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before the kernel modules are first imported: ``triton.jit`` reads it when it decorates).
``GORA_DISABLE_KERNELS=1`` (read at every call) sends every caller to the torch path.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

DISABLE_ENV = "GORA_DISABLE_KERNELS"


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_disabled() -> bool:
    """True when ``GORA_DISABLE_KERNELS`` is set to anything but "", "0" or "false"."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false")


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these tensors: triton installed, kernels not disabled, and
    all tensors on one CUDA device, or all on the CPU under the interpreter."""
    if not triton_installed() or kernels_disabled():
        return False
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    device = devices.pop()
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
