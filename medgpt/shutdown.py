"""How every medgpt process ends: the launchers (through medgpt.errors.run_cli) and the test programs
leave through exit_process, so the exit code a caller sees is the one the program meant.

Why not a plain interpreter exit: a process that joined a gloo process group next to a DeepSpeed
engine ends with gloo's C++ threads still running (measured at the end of tests/programs/engine_probe.py,
ZeRO-3 on 2 ranks: 4 ``pt_gloo_runloop`` and 2 ``gloo_tcp_loop`` threads per rank after
``destroy_process_group()``). destroy_process_group() only drops torch's own references: DeepSpeed keeps
the groups alive (``deepspeed.utils.groups._WORLD_GROUP``, the engine's ``data_parallel_group``, the ZeRO
optimizer's ``dp_process_group``, every ZeRO-3 parameter's ``ds_process_group``), so the group objects
and their worker threads outlive the interpreter. During CPython's teardown a worker that releases a
finished collective's tensor must take the GIL to free the tensor's Python object; a thread that asks
for the GIL while the interpreter finalizes is ended with pthread_exit (CPython 3.11
Python/ceval_gil.h, take_gil: tstate_must_exit -> PyThread_exit_thread), and that unwinding through a
noexcept C++ frame calls std::terminate: "terminate called without an active exception", SIGABRT,
exit -6 after the work was done (pytorch/pytorch#179291 describes it for gloo; closed unmerged).

So exit_process closes the process groups (NCCL's communicators are finalized here) and, where
torch.distributed's threads run, does the part of teardown that matters to a user, in order, while the
interpreter is whole: the atexit handlers run (medgpt's /dev/shm cleanup,
logging's flush, multiprocessing's children), stdout and stderr are flushed; then os._exit, which runs
no C++ static destructor and hands no GIL to any thread. A process without those threads (--help, bad
input, plan, report, export) exits the ordinary way, so `python -m cProfile` and the like still see its
end. stdlib only: a bad-input exit stays light.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

# Name prefixes of the native threads torch.distributed starts (/proc/self/task/*/comm): gloo's
# "pt_gloo_runloop" and "gloo_tcp_loop", NCCL's "pt_nccl_watchdg" and "pt_nccl_heartbt".
_DISTRIBUTED_THREADS = ("pt_", "gloo")


def close_process_groups() -> None:
    """Destroy torch.distributed's groups, where torch was imported and a group is open."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def teardown_is_safe() -> bool:
    """No torch.distributed thread runs in this process (where /proc cannot tell, assume one does)."""
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return False
    names = []
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text())
    return not any(name.startswith(_DISTRIBUTED_THREADS) for name in names)


def _finish_python() -> None:
    # Threads are not joined: a worker pool (torch.compile's) ends only through threading's own
    # exit hooks, which a plain join before them would wait for forever (a --compile run hung so).
    atexit._run_exitfuncs()  # the handlers, once each (CPython clears them after running them)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` (see the module docstring for why this way)."""
    close_process_groups()
    if teardown_is_safe():
        sys.exit(code)
    _finish_python()
    os._exit(code)


def exit_interrupted() -> NoReturn:
    """End this process as an uncaught KeyboardInterrupt ends Python: by SIGINT (130 in a shell)."""
    close_process_groups()
    _finish_python()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signal.SIGINT)  # not reached: the default action of SIGINT ends the process
