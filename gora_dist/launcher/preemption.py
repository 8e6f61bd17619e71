"""Preemption: a cluster scheduler sends SIGTERM (Slurm's ``--signal`` often SIGUSR1) some seconds
before it kills a job. The handler only notes the signal; the training loop asks at every step,
every rank agreeing through the step's loss all-reduce (a rank that got the signal tells the others),
then finishes that optimizer step, writes a checkpoint and exits with :data:`PREEMPTED_EXIT`, so a
job script can tell "requeue me" from success and from failure."""

from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

PREEMPTED_EXIT = 75
"""EX_TEMPFAIL: stopped by a signal with a checkpoint written; ``--resume`` continues the run."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at ``step``."""

    def __init__(self, step: int, checkpoint: str, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} written; "
                         f"continue with the same command and --resume (exit status {PREEMPTED_EXIT})")
        self.step, self.checkpoint = step, checkpoint


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set :attr:`received` instead of ending the process (in the
    main thread only; elsewhere nothing is installed). The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number, _frame) -> None:
        self.received = number

    @property
    def flag(self) -> float:
        """1.0 once a stop signal came to this process (summed over the ranks with the step's loss)."""
        return 1.0 if self.received is not None else 0.0

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal on another rank"
