"""Stop on request: SLURM's warning signal before a time limit or preemption (SIGUSR1) makes
every rank save a checkpoint at the next step boundary and exit with PREEMPTED_EXIT."""
from __future__ import annotations

import signal
from types import FrameType

from medgpt.errors import PREEMPTED_EXIT  # noqa: F401 (re-exported for the loop)


class StopRequest:
    """Set by SIGUSR1 on whichever ranks receive it; agreed on by all ranks each step."""

    def __init__(self) -> None:
        self._received = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = True  # only a flag: the save happens in the loop, collectively

    @property
    def received(self) -> bool:
        """This rank got the signal; ranks agree on it through each training step's collective."""
        return self._received
