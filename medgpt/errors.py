"""User-facing errors and the exit codes of every medgpt program: each code means one thing.

| code | meaning                                                                 | what to do          |
| ---- | ----------------------------------------------------------------------- | ------------------- |
| 0    | finished: trained, scored and exported                                   | -                   |
| 1    | an unexpected crash (a bug or a dead node): traceback in the log; or a   | read the traceback; |
|      | checkpoint that did not fit on its disk (one line says so, no traceback) | free space, rerun   |
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

import argparse
import contextlib
import difflib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from medgpt.launch_env import launch_rank
from medgpt.shutdown import exit_interrupted, exit_process

USER_ERROR_EXIT = 2
DIVERGED_EXIT = 3
STALLED_EXIT = 4
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" -- the job script requeues itself
# How long a rank other than 0 waits for rank 0 to report the same bad input and end the job.
OTHER_RANK_REPORT_DELAY_S = 60.0


class Failure(Exception):
    """A run that ends with ``exit_code`` after one ``medgpt: error:`` line per problem. Several
    problems found together travel in one failure."""
    exit_code = 1

    def __init__(self, *problems: str) -> None:
        # One line per problem (a YAML or JSON parser's message can span several).
        self.problems = [" ".join(problem.split()) for problem in problems]
        super().__init__("\n".join(self.problems))


class UserError(Failure):
    """Bad input the user can fix: each problem names what is wrong and the fix."""
    exit_code = USER_ERROR_EXIT


class NoSpaceLeft(Failure):
    """A checkpoint did not fit on its file system: a crash (exit 1) whose cause is known and said."""
    exit_code = 1


class TrainingDiverged(Failure):
    """Non-finite loss or gradients (or an fp16 loss scale that keeps overflowing)."""
    exit_code = DIVERGED_EXIT


def check_all(*checks: Callable[[], Any]) -> list[Any]:
    """Run independent checks, every one even after a failure, and report all their problems in
    one UserError; otherwise return their results in order."""
    results, problems = [], []
    for check in checks:
        try:
            results.append(check())
        except UserError as err:
            problems += err.problems
    if problems:
        raise UserError(*problems)
    return results


class CliParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (exit 2, one line each, no usage dump), and whose
    unknown flags name the closest valid one. Abbreviations are off: ``--lr`` never silently
    means a longer flag."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):
            # argparse reads a value like -1e-3 or -inf as another flag.
            message += "; write a value that starts with '-' as --flag=-value"
        raise UserError(message)

    def format_usage(self) -> str:
        with self._required_shown():
            return super().format_usage()

    def format_help(self) -> str:
        with self._required_shown():
            return super().format_help()

    @contextlib.contextmanager
    def _required_shown(self) -> Iterator[None]:
        """Required fields (medgpt.cli.add_fields) are optional to argparse, so that every missing one
        is reported at once rather than argparse's first; in --help they read as required:
        ``--checkpoint STR``, not ``[--checkpoint STR]``."""
        flagged = [a for a in self._actions if getattr(a, "shown_required", False)]
        saved = [(a.required, a.nargs) for a in flagged]
        for action in flagged:
            action.required = True
            if not action.option_strings:  # a positional: nargs "?" is what argparse brackets
                action.nargs = None
        try:
            yield
        finally:
            for action, (required, nargs) in zip(flagged, saved, strict=True):
                action.required, action.nargs = required, nargs

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: Any = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise UserError(*self.unknown_problems(unknown))
        return parsed

    def unknown_problems(self, unknown: list[str]) -> list[str]:
        """One problem per unknown flag (its value, if it had one, is not another problem)."""
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        problems: list[str] = []
        after_flag = False
        for token in unknown:
            if token.startswith("-") and not _is_number(token):
                name = token.split("=", 1)[0]
                close = difflib.get_close_matches(name, flags, n=1)
                problems.append(f"unknown flag {name}" + (f"; did you mean {close[0]}?" if close else
                                                          "; --help lists the flags"))
                after_flag = "=" not in token
            elif not after_flag:
                problems.append(f"unexpected argument '{token}'; every value follows its --flag")
            else:
                after_flag = False
        return problems


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def run_cli(main: Callable[[], None]) -> NoReturn:
    """Run a launcher's main and end the process through medgpt.shutdown, whatever happens: 0 when it
    returns; a Failure's code after one ``medgpt: error:`` line per problem (2 for bad input); a
    SystemExit's code (a stop after saving: PREEMPTED_EXIT); 1 after the traceback of a crash;
    Ctrl-C's SIGINT for a KeyboardInterrupt."""
    try:
        main()
    except Failure as err:
        report(err.problems, launch_rank())
        exit_process(err.exit_code)
    except SystemExit as end:
        exit_process(_system_exit_code(end))
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())  # its traceback, as Python prints it
        exit_interrupted()
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the collective-timeout hook (medgpt.distributed) sees it here
        exit_process(1)
    exit_process(0)


def _system_exit_code(end: SystemExit) -> int:
    """As Python reads SystemExit: None is 0, an int is itself, anything else is printed and is 1."""
    if end.code is None or isinstance(end.code, int):
        return end.code or 0
    print(end.code, file=sys.stderr)
    return 1


def report(problems: list[str], rank: int) -> None:
    """Every rank checks the same input (or step) and finds the same problems: rank 0 prints them at once, so a
    job reports each once. Another rank waits first: rank 0's exit makes the launcher (torchrun,
    deepspeed) end this one, and an early exit here would instead end rank 0 before it printed.
    A rank that outlives the wait found a problem rank 0 did not (its own node's files): it says so."""
    if rank > 0:
        # The launcher's SIGTERM (or Ctrl-C) ends the wait, through exit_process with the code of an
        # end by that signal: the rank's atexit handlers still run. (Killed by the signal's default
        # action, a rank left its 64 MiB /dev/shm buffer behind at every failed deepspeed launch.)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda received, _frame: exit_process(128 + received))
        time.sleep(OTHER_RANK_REPORT_DELAY_S)
    where = f" (rank {rank})" if rank > 0 else ""
    for problem in problems:
        print(f"medgpt: error{where}: {problem}", file=sys.stderr, flush=True)
