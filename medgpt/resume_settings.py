"""What a resumed run may change, and how a change takes effect.

A checkpoint continues one run. Each setting is one of three kinds:

- **Defining** (refused when different): what the run trains on and towards -- the records (by
  digest, so a moved or copied file is the same data), the subset, the dev fold, seq_len, long
  answers, the tokenizer's vocabulary, the prompt format, and the seed (it orders every epoch, so
  the checkpoint's position in the epoch means nothing under another). Another value is another
  run, whose checkpoints and dev and test scores would be mixed with this one's.
- **Fixed by the checkpoint** (refused, with the reason): the precision and the --select_best
  metric, here; the model shape, LoRA, packing and the global batch in medgpt.resume.
- **Applied from the resumed step**: everything else. A change is printed, kept in the
  checkpoints' history (medgpt.json, config.yaml, the model card) and in TensorBoard's text.
  The optimizer's settings need work for that: the checkpoint restores its lr, betas, eps and
  weight decay and the schedule's base lr (torch's Optimizer and LambdaLR state dicts), so they are
  set again from this run's values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from medgpt.config import Config
from medgpt.data import records_digest, tokenizer_digest
from medgpt.prompt import PROMPT_FORMAT_VERSION
from medgpt.pubmedqa import Record
from medgpt.run_setting import flat_config

# The definition's entries, as the flag a user would change to get another value.
DEFINING_FLAGS = {"data": "--data (the records)", "tokenizer": "--tokenizer (the vocabulary)", "subset": "--subset",
                  "fold": "--fold", "seq_len": "--seq_len", "long_answer": "--long_answer", "seed": "--seed",
                  "prompt_format": "the prompt format (medgpt's version)"}
NOT_A_SETTING = {"resume"}  # how this start found its checkpoint, not how the run trains


def run_definition(cfg: Config, records: list[Record], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The defining settings of a run, as recorded in each checkpoint's medgpt.json."""
    d = cfg.data
    return {"data": records_digest(records), "tokenizer": tokenizer_digest(tokenizer),
            "subset": d.subset, "fold": d.fold if d.subset == "pqa_labeled" else None, "seq_len": d.seq_len,
            "long_answer": d.long_answer, "seed": cfg.train.seed, "prompt_format": PROMPT_FORMAT_VERSION}


def _shown(name: str, value: Any) -> str:
    return f"digest {value[:12]}" if name in ("data", "tokenizer") else str(value)


def definition_problems(saved: dict[str, Any], now: dict[str, Any], tag_dir: Path) -> list[str]:
    """Every defining setting that differs, in one problem (a checkpoint from before they were
    recorded has none to compare)."""
    diffs = [f"{DEFINING_FLAGS[name]}: checkpoint {_shown(name, saved[name])}, this run {_shown(name, value)}"
             for name, value in now.items() if name in saved and saved[name] != value]
    if not diffs:
        return []
    return [f"checkpoint '{tag_dir}' belongs to another run, trained on other data or towards another objective "
            f"({'; '.join(diffs)}). Resume with the checkpoint's values, or start this run in another --output_dir"]


def fixed_problems(saved: Config, now: Config, tag_dir: Path) -> list[str]:
    """Settings the checkpoint's state was made for."""
    problems = []
    was, asked = saved.train.precision, now.train.precision
    if was != asked:
        problems.append(f"checkpoint '{tag_dir}' was trained in {was}, this run asks for {asked}: its optimizer "
                        f"state (master weights, gradient buffers) is laid out for {was}; resume with --precision "
                        f"{was}, or start fresh in another --output_dir")
    was, asked = saved.train.select_best, now.train.select_best
    if was != "none" and was != asked:
        problems.append(f"checkpoint '{tag_dir}' tracks the best dev {was} so far, this run asks for --select_best "
                        f"{asked}: the best checkpoint would be chosen by two metrics; resume with --select_best "
                        f"{was}, or start fresh in another --output_dir")
    return problems


@dataclass(frozen=True)
class SettingChange:
    name: str  # the flag's name, without the dashes
    was: Any
    now: Any
    step: int  # the first step trained with the new value

    def __str__(self) -> str:
        return f"{self.name} {self.was} -> {self.now}"

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "name": self.name, "was": self.was, "now": self.now}


def setting_changes(saved: Config, now: Config, resumed_step: int) -> list[SettingChange]:
    """The settings this run changes from the checkpoint's (defining and fixed ones are equal by now)."""
    before, after = flat_config(saved.to_dict()), flat_config(now.to_dict())
    return [SettingChange(name, before[name], value, resumed_step + 1)
            for name, value in after.items() if name not in NOT_A_SETTING and before.get(name) != value]


def apply_optimizer_settings(engine: Any, optimizer_params: dict[str, Any]) -> None:
    """This run's lr, betas, eps and weight decay (the resolved DeepSpeed config's) over those the
    checkpoint restored, and the current step's lr recomputed from the new peak. DeepSpeed's JSON
    schedulers keep only their step in a checkpoint (deepspeed/runtime/lr_schedules.py state_dict):
    their lr already comes from this run's config."""
    groups = engine.optimizer.param_groups
    for group in groups:
        group["weight_decay"] = optimizer_params["weight_decay"]
        group["betas"] = tuple(optimizer_params["betas"])
        group["eps"] = optimizer_params["eps"]
    schedule = engine.lr_scheduler
    if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
        schedule.base_lrs = [optimizer_params["lr"] for _ in groups]
        for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
            group["lr"] = base * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
