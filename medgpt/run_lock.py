"""One writer per output_dir: an exclusive ``flock`` on ``<output_dir>/.medgpt.lock``.

Global rank 0 takes it before a run writes anything into its output_dir and holds it until the
process ends; a second run into the same folder (a duplicated command, a sweep rerun while an
orphaned run still trains) is refused at start, naming the holder. The kernel drops the lock when
its holder's file is closed, so a run ended by SIGKILL or a crashed node leaves no stale lock (on
NFS, Linux maps flock to the server's locks: it holds across hosts). The file keeps the last
holder's pid and host, read for the message only: the flock alone decides.

The descriptor is not inherited by programs the rank starts (Python opens files close-on-exec,
PEP 446), so a left-over child does not keep the folder locked.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from medgpt.errors import UserError

LOCK_FILE = ".medgpt.lock"
LOCK_TRIES, LOCK_RETRY_S = 10, 0.1
_held: list[int] = []  # this process's lock descriptors: open until it exits


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "a process that has not said who it is yet"
    except OSError:
        return "another process"


def lock_holder(output_dir: str | Path) -> str | None:
    """Who holds output_dir's lock now ("pid 123 on host"), or None: nobody (or no folder yet)."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks another checker
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _holder(path)
        raise
    finally:
        os.close(fd)
    return None


def _lock_exclusive(fd: int) -> bool:
    """The exclusive lock, or False while a run holds it. A checker (``lock_holder``, a sweep's start)
    holds a shared lock for microseconds: a few tries over a second outlast it."""
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if attempt < LOCK_TRIES - 1:
            time.sleep(LOCK_RETRY_S)
    return False


def lock_output_dir(output_dir: str | Path) -> None:
    """Take output_dir's lock for the rest of this process, or refuse (exit 2) if a run holds it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _lock_exclusive(fd):
        os.close(fd)
        holder = _holder(path)
        raise UserError(f"output_dir '{folder}' is in use by another run ({holder}): one run writes to a folder "
                        "at a time. Wait for that run to end (or stop it), or use another --output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held.append(fd)
