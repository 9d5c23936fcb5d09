"""One writer per output_dir (medgpt/run_lock.py): held by a live process only, refused while held."""
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO, launch, refused, run_pids, running, tiny_args, wait_for_first_step
from medgpt.errors import UserError
from medgpt.run_lock import LOCK_FILE, lock_holder, lock_output_dir

HOLD = ("import sys; from medgpt.run_lock import lock_output_dir; lock_output_dir(sys.argv[1]); "
        "print('held', flush=True); input()")


def test_a_held_folder_is_refused_and_freed_when_its_holder_is_killed(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        who = f"pid {holder.pid} on {socket.gethostname()}"
        assert lock_holder(folder) == who
        with pytest.raises(UserError, match=re.escape(f"output_dir '{folder}' is in use by another run ({who})")):
            lock_output_dir(folder)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        holder.wait()
    assert lock_holder(folder) is None
    lock_output_dir(folder)  # this test's process holds it now, until it exits
    assert lock_holder(folder) == f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_checker_looking_at_the_same_moment_does_not_refuse_the_run(tmp_path):
    """lock_holder (a sweep's start) holds a shared lock while it looks: the run waits it out."""
    folder = tmp_path / "run"
    folder.mkdir()
    checker = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(checker, fcntl.LOCK_SH)
    threading.Timer(0.3, os.close, args=(checker,)).start()  # closing drops its lock
    lock_output_dir(folder)  # was: refused at once, naming nobody
    assert lock_holder(folder) == f"pid {os.getpid()} on {socket.gethostname()}"


def test_no_folder_no_holder(tmp_path):
    assert lock_holder(tmp_path / "nothing") is None


@pytest.mark.e2e
def test_a_second_run_into_a_running_runs_folder_is_refused(tmp_path, data_cache):
    """Before: both trained, one died with a traceback when the other deleted a step folder under it."""
    out = tmp_path / "run"
    args = tiny_args(out, data_cache, max_steps=1000, eval_every=0)
    with running(args, tmp_path / "log") as first:
        wait_for_first_step(first, out)
        (rank,) = run_pids(out)
        errors = refused(launch(args))
        assert errors == [f"output_dir '{out}' is in use by another run (pid {rank} on {socket.gethostname()}): one "
                          "run writes to a folder at a time. Wait for that run to end (or stop it), or use another "
                          "--output_dir"]
        assert first.poll() is None  # the first run goes on
    assert len(list((out / "tensorboard").glob("events*"))) == 1
