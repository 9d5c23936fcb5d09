"""Bad input: exit code 2, one `medgpt: error:` line per problem (printed once, by rank 0), no
traceback, and the output_dir exactly as it was: every case starts with an earlier run's files there."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ORI_JSON, TINY_MODEL, launch, refused, snapshot, tiny_args
from medgpt.config import build_parser, parse_config
from medgpt.errors import UserError
from medgpt.startup import check_inputs

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def no_label_file(tmp: Path) -> Path:
    record = {"QUESTION": "Is it?", "CONTEXTS": ["It is."], "LONG_ANSWER": "Yes."}
    return write(tmp / "no_label.json", json.dumps({"1": {**record, "final_decision": "yes"}, "2": record}))


def null_contexts_file(tmp: Path) -> Path:
    records = json.loads(ORI_JSON.read_text())
    records[next(iter(records))]["CONTEXTS"] = None  # once a TypeError deep in the tokenizer
    return write(tmp / "null_contexts.json", json.dumps(records))


def first_records(tmp: Path, count: int) -> Path:
    records = list(json.loads(ORI_JSON.read_text()).items())[:count]
    return write(tmp / f"first{count}.json", json.dumps(dict(records)))


def ds_config(tmp: Path, config: dict) -> Path:
    return write(tmp / "ds.json", json.dumps(config))


def model_config(tmp: Path, **changes: object) -> Path:
    return write(tmp / "model.json", json.dumps({**json.loads(TINY_MODEL.read_text()), **changes}))


def a_file(tmp: Path) -> Path:
    return write(tmp / "a_file", "an earlier result")


@dataclass(frozen=True)
class Case:
    flags: Callable[[Path], dict[str, object]]  # tmp folder -> flags changed from tiny_args
    errors: tuple[str, ...]  # one regex per problem, each matching its own `medgpt: error:` line
    launcher: str = "python"
    env: dict[str, str] = field(default_factory=dict)


STAGE_7 = {"zero_optimization": {"stage": 7}}
CASES = {
    # The command line and the values: found before DeepSpeed is imported.
    "unknown flag": Case(lambda tmp: {"lrr": 0.1}, (r"unknown flag --lrr; did you mean --lr\?$",)),
    "wrong types with another problem": Case(
        lambda tmp: {"lr": "abc", "micro_batch_size": 2.5, "precision": "fp8"},
        ("--lr: expected float, got 'abc'", "--micro_batch_size: expected int, got '2.5'",
         "precision 'fp8' is unknown")),
    "lr nan": Case(lambda tmp: {"lr": "nan"}, (r"lr must be a finite number \(got nan\)",)),
    "non-finite floats": Case(lambda tmp: {"lr": "inf", "dropout": "nan", "weight_decay": "1e999"},
                              (r"^lr must be a finite number \(got inf\)", r"^dropout must be a finite number",
                               r"^weight_decay must be a finite number \(got inf\)")),
    "lr zero": Case(lambda tmp: {"lr": 0}, (r"lr must be > 0 \(got 0.0\)",)),
    "negative peak_tflops": Case(lambda tmp: {"peak_tflops": -1}, ("peak_tflops must be a finite number >= 0",)),
    "unknown precision": Case(lambda tmp: {"precision": "fp8"}, ("precision 'fp8' is unknown",)),
    "micro_batch_size 0": Case(lambda tmp: {"micro_batch_size": 0}, (r"micro_batch_size must be >= 1 \(got 0\)",)),
    "fold outside 0..9": Case(lambda tmp: {"fold": 12}, (r"fold must be 0\.\.9",)),
    "seq_len too short": Case(lambda tmp: {"seq_len": 16}, (r"seq_len must be >= 32",)),
    "no steps": Case(lambda tmp: {"max_steps": 0, "epochs": 0}, ("set epochs or max_steps",)),
    "not a boolean": Case(lambda tmp: {"packing": "maybe"}, ("--packing: expected true or false, got 'maybe'",)),
    "min_lr_ratio above 1": Case(lambda tmp: {"min_lr_ratio": 2}, (r"min_lr_ratio must be in \[0, 1\]",)),
    "unknown YAML field": Case(lambda tmp: {"config": write(tmp / "run.yaml", "train:\n  micro_batchsize: 2\n")},
                               ("unknown field 'train.micro_batchsize'",)),
    # Start-up problems (data, model, DeepSpeed config, output_dir, checkpoint) as a whole process meets
    # them: exit 2, every one reported, nothing written. Each check alone: START_UP_CASES below.
    "offline Hub dataset": Case(lambda tmp: {"data": "qiaojin/PubMedQA"},
                                ("cannot download 'qiaojin/PubMedQA'.*ori_pqal.json",), env={"HF_HUB_OFFLINE": "1"}),
    "offline Hub pqa_artificial": Case(lambda tmp: {"data": "qiaojin/PubMedQA", "subset": "pqa_artificial"},
                                       (r"cannot download 'qiaojin/PubMedQA' \(config pqa_artificial\).*ori_pqal.json",
                                        r"cannot download 'qiaojin/PubMedQA' \(config pqa_labeled\)"),
                                       env={"HF_HUB_OFFLINE": "1"}),
    # Found once the process group exists: the world size and the resolved DeepSpeed config.
    "fp16 on CPU": Case(lambda tmp: {"precision": "fp16"}, ("fp16 needs a GPU",)),
    "inconsistent train_batch_size": Case(
        lambda tmp: {"ds_config": ds_config(tmp, {"train_batch_size": 6})},
        (r"train_batch_size=6 disagrees with micro_batch_size x grad_accum x world size \(2 x 2 x 1\)=4",)),
    "global batch above the training set": Case(lambda tmp: {"micro_batch_size": 300},
                                                ("larger than the 450 training questions",)),
    "several start-up problems": Case(
        lambda tmp: {"ds_config": ds_config(tmp, STAGE_7), "seq_len": 2048, "output_dir": a_file(tmp)},
        ("zero_optimization.stage 7", "seq_len 2048 is longer", "is a file, not a folder")),
    # Two ranks: each finds the problems, rank 0 alone prints them.
    "lr nan, torchrun x2": Case(lambda tmp: {"lr": "nan"}, ("lr must be a finite number",), launcher="torchrun"),
    "ZeRO stage 7, torchrun x2": Case(lambda tmp: {"ds_config": ds_config(tmp, STAGE_7)},
                                      ("zero_optimization.stage 7",), launcher="torchrun"),
    "lr nan, deepspeed x2": Case(lambda tmp: {"lr": "nan"}, ("lr must be a finite number",), launcher="deepspeed"),
}


# Start-up checks (medgpt.startup.check_inputs), one problem each: what they find does not depend on
# the process that runs them, so they run in this one (a process costs seconds of imports); the
# process-level contract of the same checks (exit 2, one line each, nothing written) is the
# "several start-up problems" and "offline Hub" cases above, and the launchers' cases.
START_UP_CASES = {
    "missing data file": Case(lambda tmp: {"data": tmp / "nope" / "ori_pqal.json"}, ("is not a readable",)),
    "malformed JSON": Case(lambda tmp: {"data": write(tmp / "bad.json", '{"1": {"QUESTION": ')}, ("not valid JSON",)),
    "record without final_decision": Case(lambda tmp: {"data": no_label_file(tmp)},
                                          ("record 2 has no final_decision",)),
    "a record with null CONTEXTS": Case(lambda tmp: {"data": null_contexts_file(tmp)},
                                        (r"record \d+ has contexts that are null, expected a list of texts",)),
    "20-record data file": Case(lambda tmp: {"data": first_records(tmp, 20)},
                                ("the data holds 20 questions, too few for the official split",)),
    "missing ds_config": Case(lambda tmp: {"ds_config": tmp / "absent.json"}, ("DeepSpeed config .* does not exist",)),
    "ZeRO stage 7": Case(lambda tmp: {"ds_config": ds_config(tmp, STAGE_7)},
                         ("zero_optimization.stage 7 is not a ZeRO stage; use one of 0, 1, 2, 3",)),
    "n_embd not divisible by n_head": Case(lambda tmp: {"model": model_config(tmp, n_head=3)},
                                           ("model n_embd 64 is not divisible by n_head 3",)),
    "seq_len above n_positions": Case(lambda tmp: {"seq_len": 2048},
                                      ("seq_len 2048 is longer than the model's n_positions 1024",)),
    "output_dir is a file": Case(lambda tmp: {"output_dir": a_file(tmp)}, ("output_dir .* is a file, not a folder",)),
    "output_dir under /proc": Case(lambda tmp: {"output_dir": "/proc/medgpt-bad-input-test/run"},
                                   ("output_dir '/proc/medgpt-bad-input-test/run' cannot be made",)),
    "resume from a non-checkpoint": Case(lambda tmp: {"resume": tmp}, ("is not a medgpt checkpoint",)),
}


def earlier_run(tmp: Path) -> Path:
    """An output_dir holding what a run leaves at the top (an unknown ZeRO stage once overwrote these)."""
    out = tmp / "out"
    out.mkdir()
    write(out / "config.yaml", "mine\n")
    write(out / "ds_config.json", "{}\n")
    (out / "tensorboard").mkdir()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_per_problem(tmp_path, data_cache, name):
    case = CASES[name]
    flags = {"output_dir": earlier_run(tmp_path), **case.flags(tmp_path)}
    output_dir = Path(flags.pop("output_dir"))
    before = snapshot(output_dir)
    proc = launch(tiny_args(output_dir, data_cache, **flags), launcher=case.launcher,
                  nproc=1 if case.launcher == "python" else 2, env=case.env, timeout=300)

    errors = refused(proc, case.launcher)
    assert len(errors) == len(case.errors), proc.stderr[-3000:]  # one line per problem, none printed twice
    for pattern in case.errors:
        assert len([e for e in errors if re.search(pattern, e)]) == 1, (pattern, errors)
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("name", list(START_UP_CASES))
def test_start_up_check_names_the_problem_and_writes_nothing(tmp_path, data_cache, name, monkeypatch):
    case = START_UP_CASES[name]
    flags = {"output_dir": earlier_run(tmp_path), **case.flags(tmp_path)}
    output_dir = Path(flags.pop("output_dir"))
    before = snapshot(output_dir)
    # A lone process's rank variables, set here: check_inputs would otherwise export them into this worker.
    for variable, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(variable, value)
    cfg = parse_config(tiny_args(output_dir, data_cache, **flags), build_parser())
    with pytest.raises(UserError) as err:
        check_inputs(cfg)
    assert len(err.value.problems) == len(case.errors), err.value.problems
    for pattern in case.errors:
        assert len([e for e in err.value.problems if re.search(pattern, e)]) == 1, (pattern, err.value.problems)
    assert snapshot(output_dir) == before
