"""Typed run configuration: defaults <- YAML file (--config) <- command-line flags.

The YAML file is grouped by section (``model:``, ``data:``, ``optim:``, ``train:``); on the
command line every field is a flat flag (``--lr``, ``--fold``), so field names are unique
across sections. Everything is validated once, in :func:`parse_config` (:meth:`Config.problems`), before any work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medgpt.cli import add_fields, arg, choice_problems, coerce, field_type, given_values, new_parser
from medgpt.console import VERBOSE_HELP
from medgpt.errors import CliParser, UserError
from medgpt.pubmedqa import HUB_DATASET, NUM_FOLDS, SUBSETS, fold_problem

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")
EVAL_BATCH_SIZE = 16  # questions per rank per scoring batch, in training and launcher/evaluate.py alike
SELECT_BEST = ("none", "macro_f1", "accuracy", "loss")  # loss: the dev answer-token loss, lower is better
# Where metrics and the config go (medgpt.tracking); each optional one is a package and an extra of that name.
TRACKERS = ("tensorboard", "mlflow", "wandb")
OPTIONAL_TRACKERS = ("mlflow", "wandb")
# GPT-2's Conv1D projections (module names peft matches by suffix): c_attn (q, k, v fused), c_proj
# (attention output and MLP output), c_fc (MLP input).
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
# config.yaml's records beside the sections: the settings changed on resume (medgpt.resume_settings)
# and where the run's numbers come from (medgpt.provenance). A run's config.yaml read back as
# --config ignores them.
HISTORY_KEY, PROVENANCE_KEY = "history", "provenance"
RECORD_KEYS = (HISTORY_KEY, PROVENANCE_KEY)


@dataclass
class ModelConfig:
    model: str = arg("gpt2", help="Hub name (gpt2, gpt2-medium), a save_pretrained folder, or a GPT2Config "
                     ".json for a randomly initialised model (configs/models/tiny.json)")
    tokenizer: str = arg("", help="tokenizer name or folder; empty: the model's own (Hub gpt2 for a .json config)")
    dropout: float = arg(0.1, help="dropout of the embeddings, attention and MLP, in [0, 1)")
    # transformers' gradient checkpointing; launcher/plan.py says when it is needed.
    activation_checkpointing: bool = arg(False, help="recompute each block's activations in the backward "
                                         "pass: less memory, ~1/3 more compute")
    lora_r: int = arg(0, help="LoRA rank: > 0 trains low-rank adapters on a frozen model (needs peft: "
                      "pip install 'medgpt[lora]'); 0: full fine-tuning")
    lora_alpha: float = arg(16.0, help="LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_r")
    lora_dropout: float = arg(0.05, help="dropout on the adapters' input, in [0, 1)")
    # All three by default: GPT-2 fuses q, k, v into c_attn, so the LoRA paper's q+v choice does not
    # exist here, and adapting every projection (attention and MLP) is what comes closest to full
    # fine-tuning (QLoRA, Dettmers et al. 2023, section 4) at < 1% of the parameters for r 8.
    lora_targets: str = arg(",".join(LORA_TARGETS), help="comma-separated modules that get adapters: "
                            "c_attn (q,k,v), c_proj (attention and MLP outputs), c_fc (MLP input)")

    @property
    def lora_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]


@dataclass
class DataConfig:
    data: str = arg(HUB_DATASET, help="Hub dataset id, a parquet file/folder in the Hub's layout (a snapshot "
                    "folder holding <subset>/*.parquet too), or the original ori_pqal.json / ori_pqaa.json")
    subset: str = arg("pqa_labeled", choices=SUBSETS, help="pqa_labeled: the official split (--fold); "
                      "pqa_artificial: all questions train but a 1% dev slice by pubid hash, test = pqa_labeled's")
    test_data: str = arg("", help="--subset pqa_artificial: where pqa_labeled's official test set is read; "
                         "empty: the Hub id's pqa_labeled, or <data>/pqa_labeled of a snapshot folder")
    fold: int = arg(0, help=f"which of the {NUM_FOLDS} official cross-validation folds (0..{NUM_FOLDS - 1}) is dev")
    seq_len: int = arg(1024, help="longest tokenized sample; contexts are cut to fit")
    long_answer: bool = arg(False, help="train on 'yes. <long answer>' instead of the decision alone")
    cache_dir: str = arg("", help="tokenized-data cache; empty: <HF datasets cache>/medgpt")
    # Attention stays within each sample of a packed row.
    packing: bool = arg(False, help="pack several training samples into each row of seq_len tokens "
                        "(micro_batch_size then counts rows); off: batches are grouped by length")


@dataclass
class OptimConfig:
    lr: float = arg(5e-5, help="peak learning rate (AdamW)")
    weight_decay: float = arg(0.0, help="AdamW weight decay")
    adam_beta1: float = arg(0.9, help="AdamW beta1, in [0, 1)")
    adam_beta2: float = arg(0.999, help="AdamW beta2, in [0, 1)")
    adam_eps: float = arg(1e-8, help="AdamW epsilon, > 0")
    warmup_steps: int = arg(0, help="optimizer steps of linear warmup before the cosine decay")
    min_lr_ratio: float = arg(0.0, help="the cosine decays to lr * min_lr_ratio, in [0, 1]")
    grad_clip: float = arg(1.0, help="clip the global gradient norm to this (0: no clipping)")


@dataclass
class TrainConfig:
    output_dir: str = arg("runs/medgpt", help="folder for checkpoints, logs, metrics and the exported model")
    ds_config: str = arg("ds_configs/zero2.json", help="DeepSpeed JSON config ('auto' values come from these flags)")
    precision: str = arg("bf16", choices=PRECISIONS, help="training precision (fp16 needs a GPU)")
    micro_batch_size: int = arg(4, help="samples (packed rows with --packing) per rank per micro-step")
    # No backward pass: evaluation affords larger batches.
    eval_batch_size: int = arg(EVAL_BATCH_SIZE, help="questions per rank per batch when scoring dev and test")
    grad_accum: int = arg(1, help="micro-steps accumulated per optimizer step")
    epochs: int = arg(3, help="passes over the training questions")
    max_steps: int = arg(0, help=">0: stop after this many optimizer steps, overriding epochs")
    seed: int = arg(42, help="seed of initialisation, shuffling and dropout")
    eval_every: int = arg(0, help="score the dev fold (loss, accuracy, macro-F1) every N steps "
                          "(0: only at the end)")
    log_every: int = arg(1, help="log training metrics every N steps")
    save_every: int = arg(0, help="checkpoint every N steps (0: only at the end)")
    keep_last: int = arg(2, help="checkpoints kept (0: all); the --select_best one is kept besides")
    # Dev scores come from --eval_every; the best checkpoint is saved when it is found.
    select_best: str = arg("none", choices=SELECT_BEST, help="score the test set and export from the checkpoint "
                           "with the best dev score of this metric; none: the final weights")
    early_stop: int = arg(0, help="with --select_best: stop after N evaluations without improvement (0: never)")
    resume: str = arg("auto", help="auto (the latest checkpoint in output_dir, if any), none, or a checkpoint path")
    peak_tflops: float = arg(0.0, help="per-device peak TFLOPS for perf/mfu; 0: the GPU datasheet table, "
                             "else a timed matmul")
    # auto: an error, not a silent CPU run, on a machine with GPUs torch cannot use.
    device: str = arg("auto", choices=DEVICES, help="auto: this rank's GPU if there is one, else the CPU")
    tf32: bool = arg(True, help="fp32 matmuls on TF32 tensor cores (Ampere and newer: ~8x faster, "
                     "10-bit mantissa)")
    # Off by default: on this project's CPU it did not speed up 124M steps and its compilation (minutes)
    # outweighed the tiny model's faster steps (docs/scale.md); measure on your own GPUs.
    compile: bool = arg(False, help="torch.compile the model (DeepSpeed's engine.compile(), inductor; training "
                        "rows padded to seq_len): slower start, the first step of training and of evaluation "
                        "compiles")
    max_skipped_steps: int = arg(20, help="fp16: stop (exit 3) after this many consecutive loss-scale overflows")
    # Keep it under the 30 s after which torchrun (--shutdown_timeout), deepspeed's launch.py and
    # SLURM (KillWait) SIGKILL the ranks; past it a rank exits with STALLED_EXIT without saving.
    stop_timeout: float = arg(25.0, help="seconds from a stop signal (USR1/TERM/INT) to exit: the step in "
                              "progress and its checkpoint must fit")
    # Longer than the slowest step, evaluation or checkpoint save (ranks wait at a barrier while others write).
    collective_timeout: float = arg(600.0, help="seconds a collective may wait for the other ranks before "
                                    "the rank gives up (exit 4)")
    verbose: bool = arg(False, help=VERBOSE_HELP)
    # TensorBoard is always written: launcher/report.py and a resumed run's purge read its events.
    report_to: str = arg("tensorboard", help="where metrics and the config go: a comma list of tensorboard, "
                         "mlflow, wandb (the last two are extras: pip install 'medgpt[mlflow]')")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, dict[str, Any]]) -> Config:
        """The config a checkpoint or run folder recorded (``to_dict``'s output). A field the
        recording medgpt did not have takes today's default; one it had that is gone is dropped,
        so runs of older and newer versions stay readable."""
        sections = {}
        for name, section in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(section)}
            sections[name] = section(**{k: v for k, v in saved.get(name, {}).items() if k in known})
        return cls(**sections)

    def problems(self) -> list[str]:
        """Every problem of the field values, one sentence each (a field is named at most once)."""
        t, o, d, m = self.train, self.optim, self.data, self.model
        # NaN passes every comparison below as "fine" (nan <= 0 is False): non-finite floats first,
        # and the range checks then skip them.
        nonfinite = {name: value for name, value in self._floats().items() if not math.isfinite(value)}
        problems = [f"{name} must be a finite number (got {value})" for name, value in nonfinite.items()]

        def bad(name: str, broken: bool) -> bool:
            return name not in nonfinite and broken

        for name, section in SECTIONS.items():
            problems += choice_problems(section, vars(getattr(self, name)))
        for name in ("micro_batch_size", "eval_batch_size", "grad_accum", "log_every"):
            if getattr(t, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(t, name)})")
        for name in ("epochs", "max_steps", "eval_every", "save_every", "keep_last"):
            if getattr(t, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(t, name)})")
        if t.max_skipped_steps < 1:
            problems.append(f"max_skipped_steps must be >= 1 (got {t.max_skipped_steps})")
        if bad("peak_tflops", t.peak_tflops < 0):
            problems.append(f"peak_tflops must be a finite number >= 0, the per-device peak TFLOPS for MFU "
                            f"(0 looks the GPU up or measures the device; got {t.peak_tflops})")
        for name in ("stop_timeout", "collective_timeout"):
            if not 0 < getattr(t, name) < math.inf:
                problems.append(f"{name} must be a finite number of seconds > 0 (got {getattr(t, name)})")
        if t.select_best != "none" and t.eval_every == 0:
            problems.append(f"select_best {t.select_best} needs dev scores during training: set --eval_every N")
        if t.early_stop < 0 or (t.early_stop and t.select_best == "none"):
            problems.append(f"early_stop must be >= 0 and needs --select_best, the dev metric it watches "
                            f"(got {t.early_stop})")
        problems += report_to_problems(t.report_to)
        if t.epochs == 0 and t.max_steps == 0:
            problems.append("set epochs or max_steps to more than 0")
        problems += data_problems(d)
        if bad("dropout", not 0 <= m.dropout < 1):
            problems.append(f"dropout must be in [0, 1) (got {m.dropout})")
        problems += lora_problems(m, nonfinite)
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


def trackers(report_to: str) -> list[str]:
    """The tracker names of a --report_to value ("tensorboard,mlflow")."""
    return [name.strip() for name in report_to.split(",") if name.strip()]


def report_to_problems(report_to: str) -> list[str]:
    """Unknown tracker names, and optional trackers whose package is not installed (found without
    importing it: the check runs before anything heavy is loaded)."""
    names = trackers(report_to)
    problems = [f"report_to '{name}' is unknown; use a comma list of {', '.join(TRACKERS)}"
                for name in names if name not in TRACKERS]
    return problems + [f"--report_to {name} needs the {name} package, which is not installed: "
                       f"pip install 'medgpt[{name}]'"
                       for name in names if name in OPTIONAL_TRACKERS and importlib.util.find_spec(name) is None]


def data_problems(d: DataConfig) -> list[str]:
    problems = [problem] if (problem := fold_problem(d.fold)) else []
    if d.subset == "pqa_labeled" and d.test_data:
        problems.append("test_data applies to --subset pqa_artificial only; pqa_labeled's test set is part of "
                        "--data")
    if d.subset == "pqa_artificial" and d.fold:
        problems.append(f"fold applies to --subset pqa_labeled only; pqa_artificial's dev slice is fixed by "
                        f"pubid (got --fold {d.fold})")
    if d.seq_len < 32:
        problems.append(f"seq_len must be >= 32 (got {d.seq_len})")
    return problems


def lora_problems(m: ModelConfig, nonfinite: dict[str, float]) -> list[str]:
    """The LoRA fields' problems (``nonfinite``: float fields already reported as not finite)."""
    if m.lora_r < 0:
        return [f"lora_r must be >= 0: the adapters' rank, 0 for full fine-tuning (got {m.lora_r})"]
    if m.lora_r == 0:
        return []
    problems = []
    # find_spec imports nothing: --help and bad flags stay fast.
    if importlib.util.find_spec("peft") is None:
        problems.append(f"--lora_r {m.lora_r} needs peft, which is not installed: pip install 'medgpt[lora]' "
                        "(or --lora_r 0 for full fine-tuning)")
    unknown = [name for name in m.lora_modules if name not in LORA_TARGETS]
    if unknown or not m.lora_modules:
        problems.append(f"lora_targets '{m.lora_targets}' must name some of {', '.join(LORA_TARGETS)} "
                        f"(comma-separated){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    if "lora_alpha" not in nonfinite and m.lora_alpha <= 0:
        problems.append(f"lora_alpha must be > 0 (got {m.lora_alpha})")
    if "lora_dropout" not in nonfinite and not 0 <= m.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1) (got {m.lora_dropout})")
    return problems


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _field_index() -> dict[str, tuple[str, type]]:
    """Flat field name -> (section name, type); names are unique across sections."""
    index: dict[str, tuple[str, type]] = {}
    for section_name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section_name, field_type(section, f.name))
    return index


def build_parser(description: str | None = None, shown: tuple[str, ...] = tuple(SECTIONS)) -> CliParser:
    """The parser of launcher/train.py and launcher/prepare_data.py (``description``: the launcher's).
    Every section's flags are accepted (one config file serves both); --help shows the ``shown`` ones."""
    parser = new_parser(description)
    parser.add_argument("--config", metavar="YAML", help="YAML file with model/data/optim/train sections of "
                        "these fields; flags win over the file (default: none)")
    for name, section in SECTIONS.items():
        add_fields(parser.add_argument_group(f"{name} (the YAML file's {name}: section)"), section,
                   shown=name in shown)
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
    for key in RECORD_KEYS:
        raw.pop(key, None)
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"config file '{path}': unknown section '{section}'; "
                            f"sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config file '{path}': section '{section}' must be a mapping")
    return raw


def _coerced(entries: dict[str, Any], section: type, where: str, problems: list[str]) -> dict[str, Any]:
    """The YAML values that convert to their field's type; the others become problems (so a wrong
    type does not hide the problems found after it)."""
    values = {}
    for name, value in entries.items():
        try:
            values[name] = coerce(value, field_type(section, name), f"{where}.{name}")
        except UserError as err:
            problems += err.problems
    return values


def parse_config(argv: list[str], parser: CliParser | None = None) -> Config:
    """Build the validated Config from a command line (and the YAML file it names) with ``parser``
    (a launcher's :func:`build_parser`). Every problem -- unknown flags and fields, wrong types,
    values out of range -- is reported at once."""
    parser = parser or build_parser()
    args, unknown = parser.parse_known_args(argv)
    problems = parser.unknown_problems(unknown)
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if args.config:
        for name, entries in _load_yaml(args.config).items():
            fields = {f.name for f in dataclasses.fields(SECTIONS[name])}
            for key in sorted(entries.keys() - fields):
                problems.append(f"config file '{args.config}': unknown field '{name}.{key}'; "
                                f"fields of '{name}' are {', '.join(sorted(fields))}")
            known = {key: value for key, value in entries.items() if key in fields}
            values[name].update(_coerced(known, SECTIONS[name], name, problems))
    for name, section in SECTIONS.items():
        values[name].update(given_values(args, section, problems))
    config = Config(**{name: SECTIONS[name](**vals) for name, vals in values.items()})
    problems += config.problems()
    if problems:
        raise UserError(*problems)
    return config
