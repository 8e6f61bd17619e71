"""The few collectives GoRA needs, each with a bounded wait and the phase in its error message.

With no process group (or world size 1) every call is a no-op, so the single-process path runs the
same code. Failures are agreed on collectively: a rank that hits a problem still joins the next
check with a failure flag, so every rank raises the same clear error instead of one rank dying and
the others hanging in their next collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

# --- TEST ONLY: fault injection at a named phase (tests/test_multinode.py) ---------------------------
PAUSE_PHASE_ENV, PAUSE_DIR_ENV = "GORA_TEST_PAUSE_PHASE", "GORA_TEST_PAUSE_DIR"
PAUSE_LIMIT_S = 120.0


def _test_pause(rank: int, phase: str) -> None:
    """TEST ONLY, off unless both variables are set: a rank about to issue the collective of phase
    $GORA_TEST_PAUSE_PHASE creates $GORA_TEST_PAUSE_DIR/paused-rank<R> and waits (at most 120 s)
    until $GORA_TEST_PAUSE_DIR/release exists, so a test can cut a link or kill a node exactly there."""
    if os.environ.get(PAUSE_PHASE_ENV) != phase or not os.environ.get(PAUSE_DIR_ENV):
        return
    folder = os.environ[PAUSE_DIR_ENV]
    open(os.path.join(folder, f"paused-rank{rank}"), "w").close()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
        time.sleep(0.02)


# how gloo/NCCL word a peer that went away (as opposed to other backend errors)
CONNECTION_LOST = ("connection reset", "connection closed", "connection refused", "broken pipe", "end of file",
                   "remote process exited", "socket closed")


class GoRADistributedError(RuntimeError):
    """A rank failed, timed out or disagreed during GoRA's initialisation; raised on every rank."""


class Collective:
    """all-reduce / broadcast / agreement over one process group, with a timeout per call."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout_s: float = 300.0) -> None:
        self.group = group
        self.timeout = timedelta(seconds=timeout_s)
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        backend = dist.get_backend(group) if self.active else "none"
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bytes_sent = 0  # payload bytes handed to collectives by this rank (for the benchmarks)

    def _wait(self, work, phase: str) -> None:
        started = time.monotonic()
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as failure:
            if "timed out" in str(failure).lower():
                raise GoRADistributedError(
                    f"rank {self.rank}: {phase}: no answer from the other ranks within {self.timeout.total_seconds():.0f}s "
                    f"(a rank died, hangs, took another code path, or its link is down): {failure}"
                ) from failure
            elapsed = time.monotonic() - started
            if any(sign in str(failure).lower() for sign in CONNECTION_LOST):
                # gloo: "Connection reset by peer" naming the peer's address when its process died
                raise GoRADistributedError(
                    f"rank {self.rank}: {phase}: lost the connection to another rank after "
                    f"{elapsed:.1f}s (its process or node died): {failure}"
                ) from failure
            raise GoRADistributedError(f"rank {self.rank}: {phase}: the collective failed after {elapsed:.1f}s: {failure}") from failure

    def all_reduce(self, tensor: torch.Tensor, phase: str, op=None) -> torch.Tensor:
        """In-place all-reduce (SUM by default) of ``tensor``; returns it. Moves through self.device."""
        if not self.active:
            return tensor
        _test_pause(self.rank, phase)
        staged = tensor.to(self.device)
        self.bytes_sent += staged.numel() * staged.element_size()
        self._wait(dist.all_reduce(staged, op=op or dist.ReduceOp.SUM, group=self.group, async_op=True), phase)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def broadcast(self, tensor: torch.Tensor, phase: str, src: int = 0) -> torch.Tensor:
        if not self.active:
            return tensor
        _test_pause(self.rank, phase)
        staged = tensor.to(self.device)
        self.bytes_sent += staged.numel() * staged.element_size()
        self._wait(dist.broadcast(staged, src=src, group=self.group, async_op=True), phase)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def check(self, problem: Optional[str], phase: str) -> None:
        """Every rank calls this; if any rank has a problem, every rank raises naming the ranks and why."""
        if not self.active:
            if problem:
                raise ValueError(problem)  # one process: a plain bad-input error, as apply_gora documents
            return
        flags = torch.zeros(self.world_size, dtype=torch.float64)
        flags[self.rank] = 1.0 if problem else 0.0
        self.all_reduce(flags, phase)
        failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if not failed:
            return
        messages: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(messages, problem, group=self.group)
        details = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failed)
        raise GoRADistributedError(f"{phase}: {details}")

    def agree(self, values: Sequence, phase: str) -> None:
        """Check that every rank holds the same ``values`` (a hash all-reduced with MIN and MAX)."""
        if not self.active:
            return
        digest = hashlib.sha256(json.dumps(list(values), sort_keys=True, default=str).encode()).digest()
        mine = int.from_bytes(digest[:6], "little")  # exact in float64
        low = self.all_reduce(torch.tensor([float(mine)], dtype=torch.float64), phase, op=dist.ReduceOp.MIN)
        high = self.all_reduce(torch.tensor([float(mine)], dtype=torch.float64), phase, op=dist.ReduceOp.MAX)
        if low.item() != high.item():
            holders = [None] * self.world_size
            dist.all_gather_object(holders, mine, group=self.group)
            groups = {}
            for rank, value in enumerate(holders):
                groups.setdefault(value, []).append(rank)
            raise GoRADistributedError(
                f"{phase}: ranks disagree ({len(groups)} different values held by ranks "
                f"{sorted(groups.values())}); every rank must see the same model, targets and config"
            )
