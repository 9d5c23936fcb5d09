"""The launchers' command lines: built from the dataclasses (medgpt.cli), every flag explained
with its default and choices, the same name for the same thing everywhere, and --help answered
without loading torch."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from types import ModuleType

import pytest

from conftest import PROGRAMS, REPO, launch_env
from medgpt.cli import parse_request
from medgpt.commands import EvalRequest, ExportRequest, PlanRequest
from medgpt.config import parse_config
from medgpt.errors import UserError

LAUNCHERS = ("train", "prepare_data", "evaluate", "export", "generate", "plan", "report", "sweep")
HEAVY = ("torch", "deepspeed", "transformers", "datasets")
# Flags whose values are a fixed set: their metavar lists it, as argparse's choices would.
CHOICES = {"precision": "{fp32,bf16,fp16}", "dtype": "{fp32,bf16,fp16}", "device": "{auto,cuda,cpu}",
           "split": "{test,dev}", "mode": "{loglik,generate}", "attention": "{sdpa,eager}"}


def launcher(name: str) -> ModuleType:
    """launcher/<name>.py as a module (not run: its __main__ block stays out)."""
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launcher" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(name: str) -> dict[str, argparse.Action]:
    """A launcher's visible arguments by name (a positional under its own name)."""
    actions = launcher(name).parser()._actions
    return {(a.option_strings[-1].removeprefix("--") if a.option_strings else a.dest): a for a in actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_flag_has_help_and_its_default_or_required(name):
    for flag, action in flags(name).items():
        text, _, tail = action.help.rpartition(" (")
        assert len(text) > 10, (name, flag, action.help)  # a description, not a bare "[section]"
        assert tail.startswith(("default: ", "required)")), (name, flag, action.help)
        if flag in CHOICES:
            assert action.metavar == CHOICES[flag], (name, flag, action.metavar)


def test_one_name_and_one_meaning_per_flag_across_launchers():
    by_launcher = {name: flags(name) for name in LAUNCHERS}
    for name, actions in by_launcher.items():
        assert "output" not in actions and "batch_size" not in actions, name
    for name in ("train", "evaluate", "export"):
        assert "output_dir" in by_launcher[name], name
    for name in ("train", "evaluate"):
        assert "eval_batch_size" in by_launcher[name], name
    metavars: dict[str, set[str]] = {}
    for actions in by_launcher.values():
        for flag, action in actions.items():
            metavars.setdefault(flag, set()).add(action.metavar)
    assert {flag: kinds for flag, kinds in metavars.items() if len(kinds) > 1} == {}  # same type and choices


def test_prepare_data_shows_its_flags_and_takes_all_of_trains():
    """One command line or config file serves train.py and prepare_data.py; prepare_data's --help
    lists only the model and data flags, the ones it uses."""
    shown, train = flags("prepare_data"), flags("train")
    assert {"model", "tokenizer", "data", "seq_len", "packing", "cache_dir"} <= shown.keys()
    assert not {"lr", "output_dir", "ds_config", "max_steps"} & shown.keys()
    argv = [arg for flag in train if flag != "config" for arg in (f"--{flag}", "1")]
    assert launcher("prepare_data").parser().parse_known_args(argv)[1] == []


def test_help_shows_required_flags_and_positionals_without_brackets():
    usage = " ".join(launcher("export").parser().format_usage().split())
    assert "--checkpoint STR --output_dir STR [--dtype {fp32,bf16,fp16}]" in usage
    usage = " ".join(launcher("generate").parser().format_usage().split())
    assert "--model STR [--context STR]" in usage and usage.endswith(" question")
    # ... and are still all reported at once when missing, not argparse's first one only.
    with pytest.raises(UserError) as err:
        parse_request(ExportRequest, launcher("export").parser(), [])
    assert [p.split()[0] for p in err.value.problems] == ["--checkpoint", "--output_dir"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_takes_the_deepspeed_launchers_local_rank(name):
    args, unknown = launcher(name).parser().parse_known_args(["--local_rank=1"])
    assert unknown == [] and args.local_rank == 1


@pytest.mark.parametrize("word, value", [("true", True), ("yes", True), ("on", True), ("1", True), ("TRUE", True),
                                         ("false", False), ("no", False), ("off", False), ("0", False)])
def test_booleans_take_the_usual_words(word, value):
    assert parse_config(["--packing", word]).data.packing is value
    assert parse_config(["--tf32", word]).train.tf32 is value


def test_a_bare_boolean_flag_means_true(tmp_path):
    assert parse_config(["--packing", "--lr", "0.1"]).data.packing is True
    request = parse_request(EvalRequest, launcher("evaluate").parser(),
                            ["--predictions", "p.json", "--output_dir", str(tmp_path), "--overwrite"])
    assert request.overwrite is True


def test_renamed_flags_point_to_their_new_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir, runs/eval-test, is checked here
    with pytest.raises(UserError) as err:
        parse_request(EvalRequest, launcher("evaluate").parser(),
                      ["--model", "m", "--output", "out", "--batch_size", "4"])
    assert err.value.problems == ["unknown flag --output; did you mean --output_dir?",
                                  "unknown flag --batch_size; did you mean --eval_batch_size?"]


def test_every_problem_of_a_request_is_reported_together():
    with pytest.raises(UserError) as err:
        parse_request(PlanRequest, launcher("plan").parser(),
                      ["--model", "gpt2", "--gpus", "two", "--precision", "fp8", "--nodes", "0", "--gpuz", "1"])
    assert err.value.problems == ["unknown flag --gpuz; did you mean --gpus?", "--gpus: expected int, got 'two'",
                                  "precision 'fp8' is unknown; use one of fp32, bf16, fp16",
                                  "--nodes must be >= 1 (got 0)"]
    with pytest.raises(UserError) as err:
        parse_request(PlanRequest, launcher("plan").parser(), ["--attention", "flash"])
    assert err.value.problems == ["attention 'flash' is unknown; use one of sdpa, eager",
                                  "--model is required: " + PlanRequest.__dataclass_fields__["model"].metadata["help"]]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_help_answers_without_importing_torch(name):
    proc = subprocess.run([sys.executable, str(PROGRAMS / "help_probe.py"), str(REPO / "launcher" / f"{name}.py"),
                           *HEAVY], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage, *_, result = proc.stdout.splitlines()
    assert usage.startswith(f"usage: {name}.py "), usage  # its own name (prepare_data.py once said train.py)
    assert json.loads(result) == {"heavy": []}


@pytest.mark.parametrize("flags, problem", [
    (["--gpu_mem=-5"], "--gpu_mem must be a finite number of GiB > 0 (got -5.0)"),  # not --reserve's fault
    (["--gpu_mem", "inf"], "--gpu_mem must be a finite number of GiB > 0 (got inf)"),
    (["--gpu_mem", "8", "--reserve", "8"], "--reserve must be >= 0 and below --gpu_mem 8.0 (got 8.0)"),
    (["--cpu_mem", "nan"], "--cpu_mem must be a finite number of GiB > 0 (got nan)"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1) (got 1.5)"),
])
def test_plan_memory_and_dropout_values_are_checked(flags, problem):
    with pytest.raises(UserError) as err:
        parse_request(PlanRequest, launcher("plan").parser(), ["--model", "gpt2", *flags])
    assert err.value.problems == [problem]
