"""How a run starts: fresh, or from a checkpoint, and what resuming changes.

Every rule about continuing a run lives here and answers with a :class:`ResumePlan`; the config
stays as the user gave it (the saved ``config.yaml`` is what they asked for), and the plan says
what differs: the accumulation that keeps the checkpoint's global batch on this world size, and the
settings changed since the checkpoint (medgpt.resume_settings: which may change at all).
(Whether a tag loads through DeepSpeed's universal format is decided per tag, at load:
medgpt.checkpoint.load_checkpoint.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from medgpt.checkpoint import (
    CheckpointMeta,
    TrainState,
    check_continuable,
    check_same_model,
    checkpoint_root,
    read_finished,
    read_meta,
    step_dir,
)
from medgpt.config import Config, DataConfig, TrainConfig
from medgpt.errors import UserError, check_all
from medgpt.lora import check_same_lora
from medgpt.resume_settings import SettingChange, definition_problems, fixed_problems, setting_changes

# What a run does after its last step, in order, and the files each part leaves in output_dir.
END_PARTS = {"test": ("test_metrics.json", "test_predictions.json"), "export": ("export",)}


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None  # the tag folder to load; None: a fresh start
    meta: CheckpointMeta | None
    grad_accum: int  # cfg's, or what keeps the checkpoint's global batch on this world size
    changes: list[SettingChange] = field(default_factory=list)  # settings changed since the checkpoint

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every change of a setting on resume, the checkpoint's and this run's, oldest first."""
        return [*(self.meta.history if self.meta else []), *(c.to_dict() for c in self.changes)]

    @property
    def step(self) -> int:
        return self.meta.train_state.step if self.meta else 0

    def final_checkpoint(self, t: TrainConfig) -> Path | None:
        """The checkpoint a finished run scored and exported: --select_best's, else the last."""
        return (self.meta and best_checkpoint(self.meta.train_state, t)) or self.checkpoint

    def end_parts(self, t: TrainConfig, total_steps: int, report: bool) -> list[str]:
        """The end-of-run parts still to do: all of them, unless the checkpoint's run had finished
        training; then those not recorded as completed with its final weights, or whose files are
        gone. ``report``: say so (rank 0)."""
        if self.checkpoint is None or not self.meta.train_state.finished(total_steps, t.early_stop):
            return list(END_PARTS)
        done = read_finished(self.final_checkpoint(t))
        parts = [part for part, files in END_PARTS.items()
                 if part not in done or not all(Path(t.output_dir, f).exists() for f in files)]
        if report:
            why = (f"finished all {total_steps} steps" if self.step >= total_steps
                   else f"stopped early at step {self.step} (--early_stop {t.early_stop})")
            print(f"medgpt: {self.checkpoint} already {why}; "
                  + (f"completing its {' and '.join(parts)}" if parts else "nothing to do"), flush=True)
        return parts


def best_checkpoint(state: TrainState, t: TrainConfig) -> Path | None:
    """The --select_best checkpoint of a run at ``state``, in this run's output_dir (None: no
    selection, or no evaluation yet). The current output_dir, not the recorded one: a run folder
    may have been moved or copied since."""
    if t.select_best == "none" or not state.best_step:
        return None
    return step_dir(t.output_dir, state.best_step)


def check_fresh_start(t: TrainConfig) -> None:
    """--resume none must not overwrite checkpoints a user has."""
    if t.resume == "none" and checkpoint_root(t.output_dir).exists():
        raise UserError(f"output_dir '{t.output_dir}' already holds checkpoints and --resume none would overwrite "
                        "them; use --resume auto to continue, or another --output_dir")


def _check_settings(meta: CheckpointMeta, cfg: Config, definition: dict[str, Any], tag_dir: Path) -> None:
    problems = definition_problems(meta.definition, definition, tag_dir) + fixed_problems(meta.config, cfg, tag_dir)
    if problems:
        raise UserError(*problems)


def plan_resume(cfg: Config, checkpoint: Path | None, model_config: PretrainedConfig, definition: dict[str, Any],
                world_size: int, report: bool) -> ResumePlan:
    """The plan for this run, refusing (all problems at once) a checkpoint it cannot continue.
    ``definition``: this run's (medgpt.resume_settings.run_definition). ``report``: say what differs
    from the config (rank 0)."""
    if checkpoint is None:
        return ResumePlan(None, None, cfg.train.grad_accum)
    meta = read_meta(checkpoint)
    *_, accum = check_all(lambda: check_same_model(meta, model_config, checkpoint),
                          lambda: check_continuable(meta, checkpoint),
                          lambda: check_same_lora(meta, cfg.model, checkpoint),
                          lambda: _check_same_packing(meta, cfg.data, checkpoint),
                          lambda: _check_settings(meta, cfg, definition, checkpoint),
                          lambda: _accumulation_for(meta, cfg.train.micro_batch_size, world_size))
    changes = setting_changes(meta.config, cfg, meta.train_state.step)
    if report and accum != cfg.train.grad_accum:
        print(f"medgpt: grad_accum {cfg.train.grad_accum} -> {accum} keeps the checkpoint's global batch "
              f"{meta.global_batch} on {world_size} rank(s)", flush=True)
    if report and changes:
        print(f"medgpt: changed since the checkpoint, used from step {meta.train_state.step + 1}: "
              f"{', '.join(map(str, changes))}", flush=True)
    return ResumePlan(checkpoint, meta, accum, changes)


def _accumulation_for(meta: CheckpointMeta, micro_batch_size: int, world_size: int) -> int:
    """Accumulation that keeps a resumed run's global batch equal to the checkpoint's."""
    accum, rest = divmod(meta.global_batch, micro_batch_size * world_size)
    if rest or accum == 0:
        raise UserError(f"the checkpoint's global batch {meta.global_batch} is not micro_batch_size x world size "
                        f"({micro_batch_size} x {world_size}) times a whole accumulation; pick a micro_batch_size "
                        "that divides it")
    return accum


def _check_same_packing(meta: CheckpointMeta, data: DataConfig, tag_dir: Path) -> None:
    """A checkpoint's data position counts packed rows or samples, and packs depend on seq_len:
    the position means nothing with another setting."""
    was = meta.config.data  # checkpoints from before packing: off (the field's default)
    on_off = {True: "on", False: "off"}
    if was.packing != data.packing:
        raise UserError(f"checkpoint '{tag_dir}' was trained with --packing {on_off[was.packing]}, this run asks "
                        f"for --packing {on_off[data.packing]}; its position in the epoch only holds with the same "
                        f"setting: resume with --packing {on_off[was.packing]}, or start fresh in another --output_dir")
    if data.packing and was.seq_len != data.seq_len and not meta.definition:  # else: a defining setting
        raise UserError(f"checkpoint '{tag_dir}' packed its samples into rows of seq_len {was.seq_len}, this run "
                        f"asks for {data.seq_len}; its position in the epoch only holds for the same packs: resume "
                        "with the same --seq_len, or start fresh in another --output_dir")
