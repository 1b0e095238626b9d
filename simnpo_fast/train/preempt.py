"""Preemption: a signal ends the run at the next step boundary with a checkpoint, on every rank together.

SLURM and Kubernetes send ``SIGTERM`` before they kill a job (SLURM's ``--signal=USR1@120`` sends ``SIGUSR1``
that many seconds earlier). While the step loop runs, :class:`PreemptionGuard` turns either signal into a flag;
after each step the ranks agree on it (:meth:`PreemptionGuard.agreed`: the sum over ranks of "a signal arrived
here", so a signal that reached one rank stops them all at the same step), the loop writes a checkpoint of that
step (unless the step was just checkpointed, or the stage keeps none: the finetune stage simply restarts) and
raises :class:`~simnpo_fast.errors.Preempted`: exit status 10. ``--resume`` (or ``--resume=auto``, the form
for a requeued job) continues from that checkpoint and ends with the weights of an uninterrupted run.

Outside the step loop (setup, the first evaluation, the final checkpoint, evaluation and export) the signals
keep their previous handlers: a ``SIGTERM`` there ends the process as it would without this module.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from ..distributed import all_reduce_sum

#: the signals that request a checkpoint and a clean stop
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[str] = None


def signal_received() -> Optional[str]:
    """The name of the signal this process received inside the step loop (None: none yet)."""
    return _received


class PreemptionGuard:
    """Context manager of the step loop: installs the handlers (main thread only) and restores the old ones."""

    def __init__(self, signals=SIGNALS):
        self.signals, self._old = tuple(signals), {}

    def __enter__(self) -> "PreemptionGuard":
        global _received
        _received = None
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    @staticmethod
    def _handle(signum, frame) -> None:
        global _received
        _received = _received or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def agreed(self, device: torch.device) -> Optional[str]:
        """Collective: the received signal's name if any rank received one (every rank returns the same truth
        value), else None. One all-reduce of one number per step."""
        flag = all_reduce_sum(torch.tensor([1.0 if _received else 0.0], device=device))
        return (_received or "a signal on another rank") if float(flag.item()) > 0 else None
