"""A run's *setting*: what a sweep compares. Runs of one setting differ only in which repeat they
are (fold, seed) and in how they were run (where they write, how often they log or save, how they
resume): those fields are left out. Any other field -- new ones included -- is part of the setting,
so that runs that could differ in their results are never pooled. Used by launcher/report.py to
group runs and by the trackers to group a sweep's runs (TensorBoard HParams, W&B, MLflow)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from medgpt.config import RECORD_KEYS

REPEAT_FIELDS = ("fold", "seed")
# How a run was run, not what it computed. eval_every stays in the setting: with best-checkpoint
# selection the evaluations decide which weights are scored on test. micro_batch_size and
# grad_accum are replaced by the global batch (a resumed run changes grad_accum to keep its global
# batch on another world size, and the world size is in no config field).
RUN_FIELDS = ("output_dir", "resume", "device", "cache_dir", "log_every", "save_every", "keep_last",
              "peak_tflops", "stop_timeout", "collective_timeout", "max_skipped_steps", "eval_batch_size",
              "activation_checkpointing", "report_to", "micro_batch_size", "grad_accum")


def flat_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.yaml's sections as one mapping of field names (unique across sections, as the flags);
    its records beside them (history, provenance: medgpt.config.RECORD_KEYS) are not settings."""
    return {name: value for key, section in config.items() if key not in RECORD_KEYS for name, value in section.items()}


def setting_of(config: dict[str, dict[str, Any]], global_batch: int | None) -> dict[str, Any]:
    """The fields of a run's config (config.yaml's sections) that make its setting, with the global
    batch (ds_config.json's train_batch_size) in place of micro_batch_size and grad_accum."""
    fields = flat_config(config)
    setting = {name: value for name, value in fields.items() if name not in REPEAT_FIELDS + RUN_FIELDS}
    return {**setting, "global_batch": global_batch}


def setting_id(setting: dict[str, Any]) -> str:
    """A short stable name of a setting (the same on every machine and in every tracker)."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:10]
