"""Where the Triton kernels may run, and the one switch that turns them off (no triton import here).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before the kernel modules are first imported: ``triton.jit`` reads it when it decorates).
``GORA_DISABLE_KERNELS=1`` (read at every call) sends every caller to the torch path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import cache

import torch

DISABLE_ENV = "GORA_DISABLE_KERNELS"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of x/W0/b, and of the adapters


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_disabled() -> bool:
    """True when ``GORA_DISABLE_KERNELS`` is set to anything but "", "0" or "false"."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false")


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these tensors: triton installed, kernels not disabled, every
    tensor a plain ``torch.Tensor`` or ``nn.Parameter`` (no subclass: a DTensor, FakeTensor or quantised
    weight must keep its own dispatch, and the kernels read raw storage), and all tensors on one CUDA
    device, or all on the CPU under the interpreter. ``None`` entries (no bias) are ignored."""
    if not triton_installed() or kernels_disabled():
        return False
    if any(t is not None and type(t) not in PLAIN_TYPES for t in tensors):
        return False
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    device = devices.pop()
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def kernel_dtypes(x: torch.Tensor, weights, biases, lora_as, lora_bs) -> bool:
    """The LoRA kernels' dtype contract: x, every W0 and b share one of ``KERNEL_DTYPES``; the adapters
    share one of them too (one dtype for all A and B, as the grouped shrink stacks the A's)."""
    base = {x.dtype, *(w.dtype for w in weights), *(b.dtype for b in biases if b is not None)}
    adapters = {t.dtype for t in (*lora_as, *lora_bs)}
    return len(base) == 1 and len(adapters) == 1 and base <= set(KERNEL_DTYPES) and adapters <= set(KERNEL_DTYPES)


def on_device_of(tensor: torch.Tensor):
    """Context for a launch on ``tensor``'s device: Triton launches on the *current* CUDA device and
    stream, so a tensor on cuda:1 while cuda:0 is current needs ``torch.cuda.device(1)`` around the
    launch (as torch's own ops switch internally). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
