"""What a resume may change (medgpt/resume_settings.py), without a run: the checks' messages, the
changes found, and the optimizer settings set again over those a checkpoint restores."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ORI_JSON, TOKENIZER
from medgpt.config import Config, DataConfig, ModelConfig
from medgpt.lr_schedule import warmup_cosine, warmup_cosine_factor
from medgpt.model import load_tokenizer
from medgpt.pubmedqa import load_records
from medgpt.resume_settings import (
    apply_optimizer_settings,
    definition_problems,
    fixed_problems,
    run_definition,
    setting_changes,
)

TAG = Path("runs/a/checkpoints/step4")


@pytest.fixture(scope="module")
def records_and_tokenizer():
    return load_records(str(ORI_JSON), "pqa_labeled"), load_tokenizer(ModelConfig(tokenizer=str(TOKENIZER)))


def config(**fields: object) -> Config:
    cfg = Config()
    for name, value in fields.items():
        section = next(s for s in (cfg.model, cfg.data, cfg.optim, cfg.train) if hasattr(s, name))
        setattr(section, name, value)
    return cfg


def test_every_defining_difference_is_named_in_one_problem(records_and_tokenizer):
    records, tokenizer = records_and_tokenizer
    saved = run_definition(config(), records, tokenizer)
    assert run_definition(config(lr=1.0, output_dir="elsewhere"), records, tokenizer) == saved
    now = run_definition(config(fold=3, seed=7, seq_len=256), records[:-1], tokenizer)
    (problem,) = definition_problems(saved, now, TAG)
    assert problem.startswith(f"checkpoint '{TAG}' belongs to another run")
    for part in ("--fold: checkpoint 0, this run 3", "--seed: checkpoint 42, this run 7",
                 "--seq_len: checkpoint 1024, this run 256",
                 f"--data (the records): checkpoint digest {saved['data'][:12]}"):
        assert part in problem, problem
    assert "--tokenizer" not in problem and "another --output_dir" in problem
    assert definition_problems({}, now, TAG) == []  # a checkpoint from before definitions were recorded


def test_pqa_artificial_has_no_fold(records_and_tokenizer):
    records, tokenizer = records_and_tokenizer
    a, b = (run_definition(config(subset="pqa_artificial", fold=fold), records, tokenizer) for fold in (0, 3))
    assert a == b and a["fold"] is None


def test_precision_and_the_best_metric_are_fixed_by_the_checkpoint():
    problems = fixed_problems(config(precision="fp32", select_best="macro_f1"),
                              config(precision="bf16", select_best="loss"), TAG)
    assert len(problems) == 2
    assert "trained in fp32, this run asks for bf16" in problems[0] and "--precision fp32" in problems[0]
    assert "best dev macro_f1" in problems[1] and "--select_best macro_f1" in problems[1]
    assert fixed_problems(config(select_best="none"), config(select_best="loss"), TAG) == []  # starts tracking


def test_changes_are_every_other_setting_from_the_next_step():
    changes = setting_changes(config(lr=1e-3, eval_every=5), config(lr=5e-4, eval_every=10, resume="runs/x"), 11)
    assert [(c.name, c.was, c.now, c.step) for c in changes] == [("lr", 1e-3, 5e-4, 12), ("eval_every", 5, 10, 12)]
    assert str(changes[0]) == "lr 0.001 -> 0.0005"
    assert setting_changes(config(), config(data=DataConfig().data), 3) == []


def adamw_with_schedule(lr: float, weight_decay: float) -> SimpleNamespace:
    """What the DeepSpeed engine holds at ZeRO-0 in fp32: torch's AdamW and medgpt's schedule."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=lr, weight_decay=weight_decay)
    return SimpleNamespace(optimizer=optimizer, lr_scheduler=warmup_cosine(optimizer, 2, 10, 0.0))


def test_the_new_optimizer_settings_replace_what_the_checkpoint_restored():
    saved = adamw_with_schedule(lr=1e-3, weight_decay=0.0)
    for _ in range(4):
        saved.optimizer.step()
        saved.lr_scheduler.step()
    resumed = adamw_with_schedule(lr=5e-4, weight_decay=0.1)
    resumed.optimizer.load_state_dict(saved.optimizer.state_dict())
    resumed.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3 * warmup_cosine_factor(4, 2, 10, 0.0), 0.0)  # the bug
    apply_optimizer_settings(resumed, {"lr": 5e-4, "weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-6})
    assert group["lr"] == 5e-4 * warmup_cosine_factor(4, 2, 10, 0.0)
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.1, (0.8, 0.99), 1e-6)
    resumed.optimizer.step()
    resumed.lr_scheduler.step()
    assert resumed.lr_scheduler.get_last_lr() == [5e-4 * warmup_cosine_factor(5, 2, 10, 0.0)]


def test_unchanged_settings_set_again_are_the_same_numbers():
    saved = adamw_with_schedule(lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        saved.optimizer.step()
        saved.lr_scheduler.step()
    before = [dict(g, params=None) for g in saved.optimizer.param_groups]
    apply_optimizer_settings(saved, {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8})
    assert [dict(g, params=None) for g in saved.optimizer.param_groups] == before
