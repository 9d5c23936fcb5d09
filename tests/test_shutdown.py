"""How a medgpt program ends (medgpt.shutdown, medgpt.errors.run_cli): the exit code means what
errors.py says, and what a normal interpreter exit would have done first is still done, with and
without torch.distributed's threads. Every multi-rank program of the suite ends this way too."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


EXIT_PROGRAM = """
import atexit, sys
{setup}
from medgpt.shutdown import exit_process, teardown_is_safe
print("teardown safe:", teardown_is_safe(), file=sys.stderr)
atexit.register(lambda: print("atexit ran", file=sys.stderr))
sys.stdout.write("no newline, still buffered")
exit_process(3)
print("not reached")
"""
# A gloo group that outlives destroy_process_group(), as DeepSpeed's references keep a training
# process's groups (medgpt/shutdown.py): its threads run until the process ends.
GLOO_GROUP = """
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
kept = dist.new_group()
dist.all_reduce(__import__("torch").ones(4), group=kept)
"""


@pytest.mark.parametrize("setup, safe", [
    pytest.param("", True, id="plain"),
    pytest.param(GLOO_GROUP, False, id="gloo-threads", marks=pytest.mark.e2e),  # imports torch: seconds
])
def test_exit_process_finishes_what_teardown_would_then_exits_with_the_code(setup, safe, tmp_path):
    proc = run_python(EXIT_PROGRAM.format(setup=setup))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, still buffered"
    assert proc.stderr.splitlines()[-2:] == [f"teardown safe: {safe}", "atexit ran"]


@pytest.mark.parametrize("body, code, stderr", [
    ("print('fine')", 0, ""),
    ("raise UserError('one', 'two')", 2, "medgpt: error: one\nmedgpt: error: two\n"),
    ("raise SystemExit(75)", 75, ""),
    ("raise SystemExit('as Python prints it')", 1, "as Python prints it\n"),
    ("raise ValueError('a bug')", 1, "ValueError: a bug\n"),
    ("raise KeyboardInterrupt", -signal.SIGINT, ""),
], ids=["return", "user-error", "stop", "exit-message", "crash", "ctrl-c"])
def test_run_cli_exit_codes(body, code, stderr):
    proc = run_python(f"""
        from medgpt.errors import UserError, run_cli
        def main():
            {body}
        run_cli(main)
    """)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.endswith(stderr)
    if code == 1 and "ValueError" in body:
        assert proc.stderr.startswith("Traceback (most recent call last):")  # the crash's traceback is kept
