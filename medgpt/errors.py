"""User-facing errors: one clear message and exit code 2, never a traceback wall."""
from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a launcher's main; turn a UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"medgpt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
