"""User-facing errors and the exit codes of every medgpt program: each code means one thing.

| code | meaning                                                                 | what to do          |
| ---- | ----------------------------------------------------------------------- | ------------------- |
| 0    | finished: trained, scored and exported                                   | -                   |
| 1    | an unexpected crash (a bug or a dead node): traceback in the log         | read the traceback  |
| 2    | bad input, reported before anything was written                          | fix what it says    |
| 3    | training diverged (non-finite loss or gradients, too many skipped steps) | lower lr, check data|
| 4    | a rank stalled: a collective did not complete within collective_timeout, | check the node;     |
|      | or a stop signal's step and checkpoint did not finish in stop_timeout    | resume from latest  |
| 75   | stopped on request (SIGUSR1/SIGTERM/SIGINT) after saving a checkpoint    | resume (requeue)    |

These are the ranks' codes. torchrun exits 1 whenever a rank exits non-zero, and when it was sent
SIGTERM/SIGINT itself; the `deepspeed` command passes on the first non-zero code of a rank, but dies
of a SIGTERM/SIGINT sent to it at once (143/130 in a shell) while its ranks save and exit on their own.
4 after a stop signal: nothing new was saved; `latest` still names the last complete checkpoint.
"""
from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_EXIT = 2
DIVERGED_EXIT = 3
STALLED_EXIT = 4
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" -- the job script requeues itself


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a launcher's main; turn a UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"medgpt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
