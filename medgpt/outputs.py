"""Where a program writes: checked before anything is written, so a bad path fails at once
(exit 2) instead of after minutes of start-up, and nothing the user had is overwritten."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medgpt.errors import UserError


def check_output_dir(path: str | Path, flag: str) -> None:
    """``path`` is a writable folder, or can become one: no file in the way, and its nearest
    existing folder takes a new entry. There the write is tried (a folder made and removed at once),
    because permission bits say nothing to root, nor about /proc; an existing folder is only
    asked (access(2) also reports a read-only mount), so it is left exactly as it was."""
    target = Path(path)
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise UserError(f"{flag} '{path}' is not writable; pass a folder you can write to")
        return
    if target.exists():
        raise UserError(f"{flag} '{path}' is a file, not a folder; pass a folder path")
    existing = next(p for p in target.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} '{path}' cannot be made: '{existing}' is a file; pass a folder path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".medgpt-write-test-"))
    except OSError as err:
        raise UserError(f"{flag} '{path}' cannot be made (a folder in '{existing}': {err.strerror}); "
                        "pass a folder you can write to") from None


def check_new_output_dir(path: str | Path, flag: str, overwrite_hint: str = "") -> None:
    """An output folder that must be new or empty, so no earlier result is overwritten."""
    check_output_dir(path, flag)
    target = Path(path)
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{flag} '{path}' is not empty; pass a new folder{overwrite_hint}")
