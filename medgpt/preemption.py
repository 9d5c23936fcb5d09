"""Stop on request: SLURM's warning before a time limit (SIGUSR1), a time limit, scancel or
preemption (SIGTERM to every process of the job), Kubernetes or ``kill`` (SIGTERM), Ctrl-C (SIGINT),
or the end of the ``deepspeed`` command. Every rank saves a checkpoint at the next step boundary and
exits with PREEMPTED_EXIT; a rank that cannot within ``stop_timeout`` seconds exits with STALLED_EXIT."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from medgpt.errors import STALLED_EXIT

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
LAUNCHER_POLL_S = 1.0  # how often a rank under the deepspeed launcher checks that the launcher still runs


class StopRequest:
    """Set by a stop signal on whichever ranks receive it; agreed on by all ranks each step."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.signal_name: str | None = None  # the first stop signal this rank received
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag and a deadline: the save happens in the loop, collectively. Python runs handlers
        # in the main thread only; the launcher watch below comes through here too.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            deadline = threading.Timer(self.timeout, self._give_up)
            deadline.daemon = True  # a run that finishes first exits without waiting for it
            deadline.start()

    def _give_up(self) -> None:
        """The step and its checkpoint did not finish in time: end the rank anyway, before the launcher's
        or SLURM's SIGKILL. `latest` still names the last complete checkpoint: it is written last."""
        print(f"medgpt: error: rank {os.environ.get('RANK', '0')}: stop requested ({self.signal_name}) but the "
              f"step and its checkpoint did not finish within stop_timeout {self.timeout:g} s; exiting with "
              f"{STALLED_EXIT} without saving (raise --stop_timeout, and the scheduler's grace period with it)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(STALLED_EXIT)  # the main thread may be blocked in a collective or a write

    @property
    def received(self) -> bool:
        """This rank got a stop signal; ranks agree on it through each training step's collective."""
        return self.signal_name is not None


def _parent_of(pid: int) -> int:
    """The parent pid of a process (0 once it is gone), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name before ")" may hold spaces


def _watch_launcher(launch_pid: int, runner_pid: int) -> None:
    while os.getppid() == launch_pid and _parent_of(launch_pid) == runner_pid:
        time.sleep(LAUNCHER_POLL_S)
    print(f"medgpt: rank {os.environ.get('RANK', '0')}: the deepspeed launcher (pid {runner_pid}) is gone: "
          "stopping as on SIGTERM", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the one stop path: the handler above, in the main thread


def watch_deepspeed_launcher() -> None:
    """Under the ``deepspeed`` command, turn the command's end into a stop request.

    SIGTERM to the command kills only its runner: for a local launch it installs no handler
    (deepspeed/launcher/runner.py:619-634), so its child ``deepspeed.launcher.launch`` and the ranks
    would train on under PID 1. launch.py forwards SIGTERM/SIGINT sent to itself (launch.py:251-270),
    and ends the other ranks once one exits non-zero (launch.py:279-282), then exits itself: so the
    ranks watch the chain rank -> launch.py -> runner and, when it breaks, save and exit 75, which
    makes launch.py go too. Under torchrun or srun the rank's parent is not launch.py: no watch.
    """
    launch_pid = os.getppid()
    try:
        parent_command = Path(f"/proc/{launch_pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return
    if b"deepspeed.launcher.launch" not in parent_command:
        return
    threading.Thread(target=_watch_launcher, args=(launch_pid, _parent_of(launch_pid)), daemon=True,
                     name="medgpt-launcher-watch").start()
