"""User-facing errors and the exit codes of every medgpt program: each code means one thing.

| code | meaning                                                                 | what to do          |
| ---- | ----------------------------------------------------------------------- | ------------------- |
| 0    | finished: trained, scored and exported                                   | -                   |
| 1    | an unexpected crash (a bug or a dead node): traceback in the log         | read the traceback  |
| 2    | bad input, reported before anything was written                          | fix what it says    |
| 3    | training diverged (non-finite loss or gradients, too many skipped steps) | lower lr, check data|
| 4    | a rank stalled: a collective did not complete within the timeout         | check the node      |
| 75   | stopped on request (SIGUSR1/SIGTERM/SIGINT) after saving a checkpoint    | resume (requeue)    |
"""
from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERROR_EXIT = 2
DIVERGED_EXIT = 3
STALLED_EXIT = 4
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" -- the job script requeues itself


class Failure(Exception):
    """A run that ends with ``exit_code`` after one line saying why. Every rank raises the same
    failure and rank 0 alone prints it, unless it is ``rank_specific`` (then each rank that raises it)."""
    exit_code = 1

    def __init__(self, message: str, rank_specific: bool = False) -> None:
        super().__init__(message)
        self.rank_specific = rank_specific


class UserError(Failure):
    """Bad input the user can fix: the message names the problem and the fix."""
    exit_code = USER_ERROR_EXIT


class TrainingDiverged(Failure):
    """Non-finite loss or gradients (or an fp16 loss scale that keeps overflowing)."""
    exit_code = DIVERGED_EXIT


def _is_main_process() -> bool:
    # The launchers set RANK; a plain process is rank 0. Every rank raises the same failure.
    return os.environ.get("RANK", "0") == "0"


def run_cli(main: Callable[[], None]) -> None:
    """Run a launcher's main; turn a Failure into one line on stderr and its exit code."""
    try:
        main()
    except Failure as err:
        if err.rank_specific or _is_main_process():
            print(f"medgpt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
