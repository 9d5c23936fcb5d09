"""The training loop's console progress (medgpt/progress.py): a bar on a terminal, plain lines in a file."""
import io
import re

from medgpt.progress import Progress, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(progress: Progress, steps: range) -> None:
    with progress:
        for step in steps:
            progress.update()
            progress.status(step, f"loss {step}")


def test_in_a_file_plain_lines_and_no_redraws(capsys):
    log = io.StringIO()  # a batch job's stderr: not a terminal
    run(Progress(total=3, initial=0, shown=True, every_s=0, terminal=log), range(1, 4))
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r"eta \S+$", "eta -", line) for line in lines] == [
        f"train: step {step}/3 | loss {step} | eta -" for step in (1, 2, 3)]
    assert lines[-1].endswith("eta 0s") and log.getvalue() == ""  # no bar, no "\r"


def test_in_a_file_a_line_when_due_and_at_the_end(capsys):
    run(Progress(total=100, initial=40, shown=True, every_s=3600, terminal=io.StringIO()), range(41, 101))
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "train: step 41/100", "train: step 100/100"]


def test_on_a_terminal_the_bar(capsys):
    terminal = Terminal()
    run(Progress(total=3, initial=0, shown=True, terminal=terminal), range(1, 4))
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue() and "loss 3" in terminal.getvalue()
    assert capsys.readouterr().out == ""


def test_other_ranks_show_nothing(capsys):
    terminal = Terminal()
    run(Progress(total=3, initial=0, shown=False, every_s=0, terminal=terminal), range(1, 4))
    assert terminal.getvalue() == "" and capsys.readouterr().out == ""


def test_durations():
    assert [duration(s) for s in (0, 44.6, 725, 11220, -3)] == ["0s", "45s", "12m05s", "3h07m", "0s"]
