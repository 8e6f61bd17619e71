"""Wall-clock seconds of device work for the benchmarks, the GPU (if any) synchronised around the
timed calls so queued kernels are counted. Imported from the benchmarks' folder (the GPU suite puts it
on the path); torch only inside the functions, so importing it costs nothing."""

from __future__ import annotations

import time
from typing import Callable


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones, synchronised around them."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats
