"""Peak memory per phase of a run, for benchmarks/memory.py. Off (every call a no-op) unless the
environment variable GORA_MEMORY_TRACE names a folder; then each rank samples its own memory every
few milliseconds in a thread and writes ``rank<R>.json`` there at exit:

- ``rss``: resident memory (/proc/self/statm). It follows live memory only when glibc hands big
  buffers back at once: run with MALLOC_MMAP_THRESHOLD_ fixed (e.g. 131072), which the benchmark does;
- ``heap``: glibc's own count of bytes in use (mallinfo2: arena + mmapped blocks), which does not
  depend on that setting;
- ``cuda_max_allocated``: torch.cuda.max_memory_allocated over the phase, on GPUs.

Phases are named by ``phase(name)`` calls in the launcher and in GoRA's pipeline; each lasts until
the next. The peak of a phase is the largest sample taken while it was current.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import threading
import time
from typing import Dict, Optional

ENV = "GORA_MEMORY_TRACE"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return lambda: 0

    def heap() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return heap


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Tracer:
    def __init__(self, folder: str, interval_s: float = 0.005) -> None:
        self.folder, self.interval_s = folder, interval_s
        self.heap = _heap_reader()
        self.current = "start"
        self.order = ["start"]
        self.peaks: Dict[str, Dict[str, int]] = {"start": {"rss": 0, "heap": 0}}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample_forever, daemon=True, name="gora-memory-trace")
        self.thread.start()
        atexit.register(self.write)

    def _sample(self) -> None:
        rss, heap = _rss(), self.heap()
        with self.lock:
            peak = self.peaks[self.current]
            peak["rss"] = max(peak["rss"], rss)
            peak["heap"] = max(peak["heap"], heap)

    def _sample_forever(self) -> None:
        while not self.stopped.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def _cuda_close(self, name: str) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peaks[name]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def enter(self, name: str) -> None:
        self._sample()  # the end of the phase before
        with self.lock:
            self._cuda_close(self.current)
            if name not in self.peaks:
                self.peaks[name] = {"rss": 0, "heap": 0}
                self.order.append(name)
            self.current = name
        self._sample()

    def write(self) -> None:
        self.enter("end")
        self.stopped.set()
        rank = os.environ.get("RANK", "0")
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{rank}.json"), "w") as handle:
            json.dump({"rank": int(rank), "phases": [{"name": n, **self.peaks[n]} for n in self.order]}, handle, indent=1)


_TRACER: Optional[_Tracer] = None


def phase(name: str) -> None:
    """From now on, memory counts toward phase ``name`` (no-op unless GORA_MEMORY_TRACE is set)."""
    global _TRACER
    folder = os.environ.get(ENV)
    if not folder:
        return
    if _TRACER is None:
        _TRACER = _Tracer(folder)
    _TRACER.enter(name)


def write_now() -> None:
    """Write the trace now (the launcher leaves with os._exit, which skips atexit)."""
    if _TRACER is not None:
        _TRACER.write()
