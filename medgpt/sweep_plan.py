"""What a sweep runs (launcher/sweep.py): the request, the grid of folds x seeds x hyperparameter
values, one run (name, output folder, training flags) per point, and ``<sweep>/sweep.json``.

Every run is a normal medgpt run: its flags are the sweep's training flags, then its grid values,
then ``--fold --seed --output_dir <sweep>/runs/<name> --resume auto`` (later flags win). Each run's
whole command line is checked with medgpt.config before anything runs or is written, so a bad
value fails the sweep at once (exit 2), not hours in. Light (no torch): ``--help`` and bad input
are answered at once.

    python -m medgpt.sweep_plan <sweep folder> <index>   # the flags of run <index>, one a line

(what an array task of ``launcher/sweep.py --slurm`` runs: slurm/common.sh).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.cli import Request, arg
from medgpt.config import SECTIONS, parse_config
from medgpt.errors import UserError, check_all, run_cli
from medgpt.outputs import check_output_dir
from medgpt.pubmedqa import NUM_FOLDS

SWEEP_FILE = "sweep.json"
LAUNCHERS = ("deepspeed", "torchrun", "python")
# Flags the sweep sets for every run itself: given again, they would be silently overridden.
SWEEP_SET = {"fold": "--folds", "seed": "--seeds", "output_dir": "the sweep folder (runs/<name> in it)",
             "resume": "the sweep (--resume auto: a rerun resumes)"}


@dataclass(frozen=True, kw_only=True)
class SweepRequest(Request):
    sweep_dir: str = arg(help="the sweep's folder: sweep.json, runs/<name>/ (one output_dir a run), logs/",
                         positional=True)
    folds: str = arg("0", help=f"folds to run, comma-separated or a range (0,1 or 0-{NUM_FOLDS - 1})")
    seeds: str = arg("42", help="seeds to run, comma-separated or a range (1,2,3 or 1-3)")
    grid: tuple[str, ...] = arg((), help="a training flag and its values, e.g. lr=1e-4,3e-4 (repeat the flag "
                                "for several: every combination runs)")
    launcher: str = arg("deepspeed", choices=LAUNCHERS, help="what starts each run: the deepspeed launcher, "
                        "torchrun (both --nproc ranks) or one python process")
    nproc: int = arg(1, help="ranks per run (per node with --slurm)")
    slurm: bool = arg(False, help="submit the runs as a SLURM job array (one task a run) and the report "
                      "job after it, instead of running them here one after another")
    sbatch_args: str = arg("", help="with --slurm: more sbatch options for every run, split on spaces, "
                           "e.g. '--nodes 2 --gpus-per-node 8 --time 4:00:00'")

    def problems(self) -> list[str]:
        problems = []
        if self.nproc < 1 or (self.launcher == "python" and self.nproc != 1):
            problems.append(f"--nproc must be >= 1, and 1 with --launcher python (got {self.nproc}); "
                            "use --launcher deepspeed or torchrun for several ranks")
        if self.slurm and self.launcher == "python":
            problems.append("--slurm runs each task with slurm/train.sbatch (torchrun) or "
                            "slurm/train_deepspeed.sbatch: use --launcher torchrun or deepspeed")
        if self.sbatch_args and not self.slurm:
            problems.append("--sbatch_args is for --slurm only")
        return problems


@dataclass(frozen=True)
class Run:
    """One point of the grid: a normal medgpt run in its own output folder."""
    name: str
    fold: int
    seed: int
    overrides: dict[str, str]  # grid flag -> value, as given
    output_dir: str
    args: list[str]  # launcher/train.py's whole command line


@dataclass(frozen=True)
class Sweep:
    """The runs of a sweep folder and how they were asked for (sweep.json)."""
    sweep_dir: str
    train_args: list[str]
    folds: list[int]
    seeds: list[int]
    grid: dict[str, list[str]]
    runs: list[Run]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def int_list(text: str, flag: str) -> list[int]:
    """'0,2,5' or '0-3' (or both: '0-2,7') as a list of distinct ints, in the order given."""
    values: list[int] = []
    for part in text.split(","):
        bounds = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not bounds:
            raise UserError(f"{flag} '{text}': '{part}' is not a number or a range a-b; write e.g. 0,1 or 0-4")
        low, high = int(bounds[1]), int(bounds[2] or bounds[1])
        if high < low:
            raise UserError(f"{flag} '{text}': the range {part} is empty; write low-high")
        values += range(low, high + 1)
    if len(set(values)) != len(values):
        raise UserError(f"{flag} '{text}' names a value twice")
    return values


def parse_folds(text: str) -> list[int]:
    folds = int_list(text, "--folds")
    if not all(0 <= fold < NUM_FOLDS for fold in folds):
        raise UserError(f"--folds '{text}': folds are 0..{NUM_FOLDS - 1}, the official cross-validation folds")
    return folds


def parse_grid(entries: tuple[str, ...]) -> dict[str, list[str]]:
    """``--grid key=v1,v2`` entries as {key: [v1, v2]}: every key a training flag the sweep does not set."""
    fields = {f.name for section in SECTIONS.values() for f in dataclasses.fields(section)} | {"config"}
    grid: dict[str, list[str]] = {}
    problems = []
    for entry in entries:
        key, sep, text = entry.partition("=")
        key = key.strip().removeprefix("--")
        values = [value.strip() for value in text.split(",")]
        if not sep or not key or "" in values:
            problems.append(f"--grid '{entry}': write a training flag and its values, e.g. --grid lr=1e-4,3e-4")
        elif key in SWEEP_SET:
            problems.append(f"--grid '{entry}': {key} is set by {SWEEP_SET[key]}")
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            problems.append(f"--grid '{entry}': {key} is not a training flag"
                            + (f"; did you mean {close[0]}?" if close else " (launcher/train.py --help lists them)"))
        elif key in grid or len({value_label(value) for value in values}) != len(values):
            problems.append(f"--grid '{entry}': each flag once, each value once (a path by its file name, "
                            "which names the runs' folders)")
        else:
            grid[key] = values
    if problems:
        raise UserError(*problems)
    return grid


def check_train_args(train_args: list[str]) -> None:
    """The training flags (after ``--``) must leave to the sweep what it sets for every run."""
    given = {token.split("=", 1)[0].removeprefix("--") for token in train_args if token.startswith("--")}
    problems = [f"--{name} among the training flags: it is set by {SWEEP_SET[name]}" for name in SWEEP_SET
                if name in given]
    problems += [f"a training flag holds a line break ({token!r}); every flag and value on one line"
                 for token in train_args if "\n" in token]  # an array task reads its flags one a line
    if problems:
        raise UserError(*problems)


def value_label(value: str) -> str:
    """A grid value as its runs' folder names show it: a path by its file name, no separators."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(value).name)


def run_name(overrides: dict[str, str], fold: int, seed: int) -> str:
    """A folder name that says the point: lr-3e-4_fold0_seed42."""
    return "_".join([*(f"{key}-{value_label(value)}" for key, value in overrides.items()), f"fold{fold}",
                     f"seed{seed}"])


def make_runs(sweep_dir: Path, train_args: list[str], folds: list[int], seeds: list[int],
              grid: dict[str, list[str]]) -> list[Run]:
    """Every combination, grid values outermost, then folds, then seeds (one setting's runs together)."""
    runs = []
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values, strict=True))
        grid_args = [item for key, value in overrides.items() for item in (f"--{key}", value)]
        for fold, seed in itertools.product(folds, seeds):
            name = run_name(overrides, fold, seed)
            output_dir = str(sweep_dir / "runs" / name)
            args = [*train_args, *grid_args, "--fold", str(fold), "--seed", str(seed),
                    "--output_dir", output_dir, "--resume", "auto"]
            runs.append(Run(name, fold, seed, overrides, output_dir, args))
    return runs


def check_runs(runs: list[Run]) -> None:
    """Each run's command line parses into a valid training config. A problem of every run (a bad
    training flag) is reported once, one of some runs with the grid values they share."""
    found: dict[str, list[str]] = {}
    for run in runs:
        try:
            parse_config(run.args)
        except UserError as err:
            for problem in err.problems:
                found.setdefault(problem, []).append(run.name)
    problems = [problem if len(names) == len(runs) else f"{problem} ({_where(runs, names)})"
                for problem, names in found.items()]
    if problems:
        raise UserError(*problems)


def _where(runs: list[Run], names: list[str]) -> str:
    """The grid values that the named runs share ('with dropout=2'), else their names."""
    chosen = [run for run in runs if run.name in names]
    shared = set.intersection(*(set(run.overrides.items()) for run in chosen))
    if shared:
        return "with " + ", ".join(f"{key}={value}" for key, value in sorted(shared))
    return "runs " + ", ".join(dict.fromkeys(names))


def check_sweep_dir(sweep: Sweep) -> None:
    """A new or empty folder, or this same sweep's folder (a rerun): never another sweep's, nor a
    folder of other files."""
    folder = Path(sweep.sweep_dir)
    check_output_dir(folder, "sweep_dir")
    record = folder / SWEEP_FILE
    if record.is_file():
        try:
            before = [(run["name"], run["args"]) for run in json.loads(record.read_text())["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"sweep_dir '{folder}': {SWEEP_FILE} is unreadable ({err}); pass a new folder") from None
        if before != [(run.name, run.args) for run in sweep.runs]:
            raise UserError(f"sweep_dir '{folder}' holds another sweep (its {SWEEP_FILE} lists other runs or "
                            "flags); rerun it with the same folds, seeds, grid and training flags, or pass a "
                            "new folder")
    elif folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"sweep_dir '{folder}' is not empty and holds no {SWEEP_FILE}; pass a new folder")


def plan_sweep(request: SweepRequest, train_args: list[str]) -> Sweep:
    """The sweep a command line asks for, every problem of it reported at once (nothing written)."""
    sweep_dir = Path(request.sweep_dir).absolute()
    folds, seeds, grid, _ = check_all(lambda: parse_folds(request.folds),
                                      lambda: int_list(request.seeds, "--seeds"),
                                      lambda: parse_grid(request.grid), lambda: check_train_args(train_args))
    runs = make_runs(sweep_dir, train_args, folds, seeds, grid)
    sweep = Sweep(str(sweep_dir), train_args, folds, seeds, grid, runs)
    check_all(lambda: check_runs(runs), lambda: check_sweep_dir(sweep))
    return sweep


def write_sweep(sweep: Sweep) -> Path:
    path = Path(sweep.sweep_dir) / SWEEP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sweep.to_json(), indent=2) + "\n")
    os.replace(tmp, path)  # a reader (an array task) never sees half a file
    return path


def read_run(sweep_dir: str, index: int) -> Run:
    """Run ``index`` of a sweep folder's sweep.json."""
    runs = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())["runs"]
    if not 0 <= index < len(runs):
        raise UserError(f"{sweep_dir}/{SWEEP_FILE} has {len(runs)} runs, no run {index}")
    return Run(**runs[index])


if __name__ == "__main__":  # an array task asks for its run's flags (slurm/common.sh)
    run_cli(lambda: print("\n".join(read_run(sys.argv[1], int(sys.argv[2])).args)))
