"""Typed run configuration: defaults <- YAML file (--config) <- command-line flags.

The YAML file is grouped by section (``model:``, ``data:``, ``optim:``, ``train:``); on the
command line every field is a flat flag (``--lr``, ``--fold``), so field names are unique
across sections. Everything is validated once, in :func:`Config.validate`, before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medgpt.errors import CliParser, UserError

HUB_DATASET = "qiaojin/PubMedQA"
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ModelConfig:
    # Hub name ("gpt2", "gpt2-medium"), a save_pretrained folder, or a GPT2Config .json
    # file for a randomly initialised model (configs/models/tiny.json).
    model: str = "gpt2"
    # Tokenizer name or folder; empty means the model's own (Hub "gpt2" for a .json config).
    tokenizer: str = ""
    dropout: float = 0.1
    # Recompute each block's activations in the backward pass (transformers' gradient
    # checkpointing): less memory, ~1/3 more compute. launcher/plan.py says when it is needed.
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    # Hub dataset id (config pqa_labeled), a parquet file/folder in the Hub's layout,
    # or the original ori_pqal.json.
    data: str = HUB_DATASET
    fold: int = 0  # which of the 10 official cross-validation folds is dev
    seq_len: int = 1024  # longest tokenized sample; contexts are cut to fit
    long_answer: bool = False  # train on "yes. <long answer>" instead of the decision alone
    cache_dir: str = ""  # tokenized-data cache; empty means <HF datasets cache>/medgpt
    # Pack several training samples into each row of seq_len tokens (attention stays within each
    # sample); micro_batch_size then counts packed rows. Off: batches are grouped by length.
    packing: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    output_dir: str = "runs/medgpt"
    ds_config: str = "ds_configs/zero2.json"
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    micro_batch_size: int = 4
    eval_batch_size: int = 16  # no backward pass: evaluation affords larger batches
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int = 0  # >0 stops after this many optimizer steps, overriding epochs
    seed: int = 42
    eval_every: int = 0  # held-out loss every N steps (0: only at the end)
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (0: all)
    resume: str = "auto"  # auto (latest in output_dir, if any) | none | a checkpoint path
    peak_tflops: float = 0.0  # per-device peak for perf/mfu; 0: the GPU datasheet table, else a timed matmul
    device: str = "auto"  # auto (this rank's GPU, an error if the machine has GPUs torch cannot use) | cuda | cpu
    tf32: bool = True  # fp32 matmuls on TF32 tensor cores (Ampere and newer GPUs; ~8x faster, 10-bit mantissa)
    max_skipped_steps: int = 20  # fp16: stop (exit 3) after this many consecutive loss-scale overflows
    # Seconds from a stop signal (USR1/TERM/INT) to exit: the step in progress and its checkpoint must fit.
    # Past it a rank exits with STALLED_EXIT without saving. Keep it under the 30 s after which torchrun
    # (--shutdown_timeout), deepspeed's launch.py and SLURM (KillWait) SIGKILL the ranks.
    stop_timeout: float = 25.0
    # Seconds a collective may wait for the other ranks before the rank gives up with STALLED_EXIT: longer
    # than the slowest step, evaluation or checkpoint save (ranks wait at a barrier while others write).
    collective_timeout: float = 600.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field once; report all problems together."""
        problems = self.problems()
        if problems:
            raise UserError(*problems)

    def problems(self) -> list[str]:
        """Every problem of the field values, one sentence each (a field is named at most once)."""
        t, o, d, m = self.train, self.optim, self.data, self.model
        # NaN passes every comparison below as "fine" (nan <= 0 is False): non-finite floats first,
        # and the range checks then skip them.
        nonfinite = {name: value for name, value in self._floats().items() if not math.isfinite(value)}
        problems = [f"{name} must be a finite number (got {value})" for name, value in nonfinite.items()]

        def bad(name: str, broken: bool) -> bool:
            return name not in nonfinite and broken

        if t.precision not in PRECISIONS:
            problems.append(f"precision '{t.precision}' is unknown; use one of {', '.join(PRECISIONS)}")
        for name in ("micro_batch_size", "eval_batch_size", "grad_accum", "log_every"):
            if getattr(t, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(t, name)})")
        for name in ("epochs", "max_steps", "eval_every", "save_every", "keep_last"):
            if getattr(t, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(t, name)})")
        if t.device not in DEVICES:
            problems.append(f"device '{t.device}' is unknown; use one of {', '.join(DEVICES)}")
        if t.max_skipped_steps < 1:
            problems.append(f"max_skipped_steps must be >= 1 (got {t.max_skipped_steps})")
        if bad("peak_tflops", t.peak_tflops < 0):
            problems.append(f"peak_tflops must be a finite number >= 0, the per-device peak TFLOPS for MFU "
                            f"(0 looks the GPU up or measures the device; got {t.peak_tflops})")
        for name in ("stop_timeout", "collective_timeout"):
            if not 0 < getattr(t, name) < math.inf:
                problems.append(f"{name} must be a finite number of seconds > 0 (got {getattr(t, name)})")
        if t.epochs == 0 and t.max_steps == 0:
            problems.append("set epochs or max_steps to more than 0")
        if not 0 <= d.fold <= 9:
            problems.append(f"fold must be 0..9, one of the 10 official folds (got {d.fold})")
        if d.seq_len < 32:
            problems.append(f"seq_len must be >= 32 (got {d.seq_len})")
        if bad("dropout", not 0 <= m.dropout < 1):
            problems.append(f"dropout must be in [0, 1) (got {m.dropout})")
        if bad("lr", o.lr <= 0):
            problems.append(f"lr must be > 0 (got {o.lr})")
        for name in ("warmup_steps", "grad_clip", "weight_decay"):
            if bad(name, getattr(o, name) < 0):
                problems.append(f"{name} must be >= 0 (got {getattr(o, name)})")
        for name in ("adam_beta1", "adam_beta2"):
            if bad(name, not 0 <= getattr(o, name) < 1):
                problems.append(f"{name} must be in [0, 1) (got {getattr(o, name)})")
        if bad("adam_eps", o.adam_eps <= 0):
            problems.append(f"adam_eps must be > 0 (got {o.adam_eps})")
        if bad("min_lr_ratio", not 0 <= o.min_lr_ratio <= 1):
            problems.append(f"min_lr_ratio must be in [0, 1] (got {o.min_lr_ratio})")
        return problems

    def _floats(self) -> dict[str, float]:
        """Every float field by its flat name."""
        return {name: getattr(getattr(self, section), name) for name, (section, kind) in _field_index().items()
                if kind is float}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _field_type(section: type, name: str) -> type:
    hint = typing.get_type_hints(section)[name]
    if isinstance(hint, types.UnionType):  # "int | None" style: take the non-None member
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(value: Any, kind: type, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or say why not."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: expected true or false, got '{value}'")
    if kind is float and isinstance(value, str):
        value = value.strip()
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {kind.__name__}, got '{value}'") from None


def _field_index() -> dict[str, tuple[str, type]]:
    """Flat field name -> (section name, type); names are unique across sections."""
    index: dict[str, tuple[str, type]] = {}
    for section_name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section_name, _field_type(section, f.name))
    return index


def build_parser() -> CliParser:
    parser = CliParser(
        prog="train.py",
        description="Fine-tune GPT-2 on PubMedQA with DeepSpeed. Every field of the YAML config "
        "is also a flag; flags win over the file.",
    )
    parser.add_argument("--config", help="YAML file with model/data/optim/train sections")
    # The deepspeed launcher appends --local_rank; the environment carries the same value.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, (section, kind) in _field_index().items():
        parser.add_argument(f"--{name}", default=None, metavar=kind.__name__.upper(), help=f"[{section}]")
    return parser


def _load_yaml(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' does not exist; pass --config with a YAML file path")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file '{path}' must be a mapping of sections {', '.join(SECTIONS)}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"config file '{path}': unknown section '{section}'; "
                            f"sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config file '{path}': section '{section}' must be a mapping")
    return raw


def _coerced(entries: dict[str, Any], kind_of: dict[str, type], where: str, problems: list[str]) -> dict[str, Any]:
    """The values that convert to their field's type; the others become problems (so a wrong type
    does not hide the problems found after it)."""
    values = {}
    for name, value in entries.items():
        try:
            values[name] = _coerce(value, kind_of[name], where.format(name=name))
        except UserError as err:
            problems += err.problems
    return values


def parse_config(argv: list[str]) -> Config:
    """Build the validated Config from a command line (and the YAML file it names). Every
    problem -- unknown flags and fields, wrong types, values out of range -- is reported at once."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    problems = parser.unknown_problems(unknown)
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    index = _field_index()
    kind_of = {name: kind for name, (_, kind) in index.items()}
    if args.config:
        for section, entries in _load_yaml(args.config).items():
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            for key in sorted(entries.keys() - fields):
                problems.append(f"config file '{args.config}': unknown field '{section}.{key}'; "
                                f"fields of '{section}' are {', '.join(sorted(fields))}")
            known = {key: value for key, value in entries.items() if key in fields}
            values[section].update(_coerced(known, kind_of, f"{section}.{{name}}", problems))
    flags = {name: getattr(args, name) for name in index if getattr(args, name) is not None}
    for name, value in _coerced(flags, kind_of, "--{name}", problems).items():
        values[index[name][0]][name] = value
    config = Config(**{name: SECTIONS[name](**vals) for name, vals in values.items()})
    problems += config.problems()
    if problems:
        raise UserError(*problems)
    return config
