"""Where the Triton kernels may run, and the one switch that turns them off (no triton import here).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before the kernel modules are first imported: ``triton.jit`` reads it when it decorates).
On CUDA they run only when asked for, ``GORA_KERNELS=1``: on an H200 (benchmarks/results/
gpu_nvidia_h200.md) torch was faster end to end, SFT steps of a 1B model 0.12 s against 0.18 s and
GoRA's B0 solve 55 ms against 114 ms; the kernels' one gain there was 3.5 GiB less peak memory.
Under the interpreter they always run (that is what it is set for: testing them).
``GORA_DISABLE_KERNELS=1`` (read at every call, like ``GORA_KERNELS``) sends every caller to torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import cache

import torch

DISABLE_ENV = "GORA_DISABLE_KERNELS"
ENABLE_ENV = "GORA_KERNELS"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of x/W0/b, and of the adapters


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_disabled() -> bool:
    """True when ``GORA_DISABLE_KERNELS`` is set to anything but "", "0" or "false"."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false")


def kernels_asked_for() -> bool:
    """True when ``GORA_KERNELS`` is set to anything but "", "0" or "false"."""
    return os.environ.get(ENABLE_ENV, "").strip().lower() not in ("", "0", "false")


def kernels_run_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device`` (triton aside): CUDA when asked for with
    ``GORA_KERNELS=1``, the CPU under the interpreter, nowhere with ``GORA_DISABLE_KERNELS=1``."""
    if kernels_disabled():
        return False
    return (device.type == "cuda" and kernels_asked_for()) or (device.type == "cpu" and interpreting())


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these tensors: triton installed, the kernels wanted on their
    device (:func:`kernels_run_on`), every
    tensor a plain ``torch.Tensor`` or ``nn.Parameter`` (no subclass: a DTensor, FakeTensor or quantised
    weight must keep its own dispatch, and the kernels read raw storage), and all tensors on one CUDA
    device, or all on the CPU under the interpreter. ``None`` entries (no bias) are ignored."""
    if not triton_installed():
        return False
    if any(t is not None and type(t) not in PLAIN_TYPES for t in tensors):
        return False
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    return kernels_run_on(devices.pop())


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
