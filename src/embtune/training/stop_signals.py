"""Pre-emption: SIGTERM, SIGUSR1 and Ctrl-C stop a run at the next step boundary, checkpointed.

Cluster schedulers ask a job to leave before they kill it: SLURM sends SIGTERM (or SIGUSR1 with
``--signal``) some seconds ahead, Kubernetes SIGTERM with a grace period. Dying on the spot
would lose every step since the last periodic checkpoint. Instead the handler only notes the
signal; the step loop finishes the step it is in, writes a checkpoint and stops with exit status
3, and ``--resume`` continues exactly. A second Ctrl-C interrupts at once (exit 130), for a user
who does not want to wait for the step.

Under torchrun every process must stop after the same step (their checkpoint is one), so the
note is added up over processes at each step boundary (:meth:`StopSignals.requested`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Notes the stop signals while installed (a context manager around the step loop)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Python delivers signals to the main thread only; a run started from another thread
        # (a notebook's worker) keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _note(self, number: int, frame: FrameType | None) -> None:
        if number == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name

    def requested(self, accelerator: Accelerator) -> str | None:
        """The signal that asks the run to stop after this step, on any process, or None."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return None
        return self.received or "a stop signal (on another process)"
