"""What launcher/evaluate.py, export.py, generate.py, plan.py and report.py are asked to do: one dataclass
each, whose fields are the command line's flags (medgpt.cli); launcher/train.py and
prepare_data.py take medgpt.config's. Light on purpose (no torch): ``--help`` and bad flags are
answered before a launcher loads the heavy modules that do the work."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from medgpt.cli import Request, arg
from medgpt.config import DEVICES, EVAL_BATCH_SIZE, LORA_TARGETS, PRECISIONS, ModelConfig, lora_problems
from medgpt.errors import UserError
from medgpt.memory_plan import ATTENTIONS
from medgpt.outputs import check_new_output_dir, check_output_dir
from medgpt.pubmedqa import HUB_DATASET, NUM_FOLDS, fold_problem

SPLITS = ("test", "dev")
MODES = ("loglik", "generate")
# Help shared by the flags of several launchers: one wording for one meaning.
MODEL_FOLDER_HELP = "save_pretrained folder of the model (a training run's <output_dir>/export)"
TOKENIZER_HELP = "tokenizer name or folder; empty: the model folder's own"
DEVICE_HELP = "auto: this rank's GPU if there is one, else the CPU"
FALLBACK_SEQ_LEN = 1024  # evaluate.py's seq_len for a model folder that does not say (GPT-2's positions)


@dataclass(frozen=True, kw_only=True)
class EvalRequest(Request):
    model: str = arg("", help=MODEL_FOLDER_HELP)
    split: str = arg("test", choices=SPLITS, help="test: the official 500 questions; dev: CV fold --fold")
    fold: int = arg(0, help=f"which of the {NUM_FOLDS} official cross-validation folds (0..{NUM_FOLDS - 1}) "
                    "is dev")
    data: str = arg(HUB_DATASET, help="Hub dataset id, a parquet file/folder in the Hub's layout, or ori_pqal.json")
    tokenizer: str = arg("", help=TOKENIZER_HELP)
    output_dir: str = arg("", help="folder for predictions.json and metrics.json; empty: runs/eval-<split> "
                          "(with --predictions: print only)")
    device: str = arg("auto", choices=DEVICES, help=DEVICE_HELP)
    eval_batch_size: int = arg(EVAL_BATCH_SIZE, help="questions per rank per batch when scoring")
    seq_len: int | None = arg(None, help="longest prompt + answer in tokens; contexts are cut to fit. Unset: the "
                              f"seq_len a medgpt export was trained with, else {FALLBACK_SEQ_LEN}")
    mode: str = arg("loglik", choices=MODES, help="loglik: the likeliest of yes/no/maybe; generate: greedy "
                    "text, first word parsed")
    predictions: str = arg("", help="rescore this predictions.json against the split's gold labels (no model)")
    overwrite: bool = arg(False, help="replace predictions.json / metrics.json in a non-empty --output_dir "
                          "(else refused: nothing is overwritten)")

    def problems(self) -> list[str]:
        problems = []
        if problem := fold_problem(self.fold):
            problems.append(problem)
        if self.eval_batch_size < 1 or (self.seq_len is not None and self.seq_len < 32):
            problems.append(f"eval_batch_size must be >= 1 and seq_len >= 32 "
                            f"(got {self.eval_batch_size}, {self.seq_len})")
        if not self.model and not self.predictions:
            problems.append("pass --model <saved model folder>, or --predictions <file> to rescore one")
        try:
            self._check_output_dir()
        except UserError as err:
            problems += err.problems
        return problems

    def _check_output_dir(self) -> None:
        """Nothing the user had is overwritten: a folder with results is refused unless --overwrite."""
        if self.writes_output and self.overwrite:
            check_output_dir(self.results_dir, "--output_dir")
        elif self.writes_output:
            check_new_output_dir(self.results_dir, "--output_dir",
                                 overwrite_hint=", or --overwrite to replace its results")

    @property
    def writes_output(self) -> bool:
        """Rescoring writes metrics.json only where --output_dir is given."""
        return bool(self.output_dir) or not self.predictions

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir or f"runs/eval-{self.split}")


@dataclass(frozen=True, kw_only=True)
class ExportRequest(Request):
    checkpoint: str = arg(help="a run's output_dir, its checkpoints/ folder, or one checkpoints/step<N> folder")
    output_dir: str = arg(help="new folder for config.json, model.safetensors and the tokenizer")
    dtype: str = arg("fp32", choices=PRECISIONS, help="precision of the saved weights")


@dataclass(frozen=True, kw_only=True)
class GenerateRequest(Request):
    question: str = arg(help="the question, e.g. \"Does aspirin prevent stroke?\"", positional=True)
    model: str = arg(help=MODEL_FOLDER_HELP)
    context: tuple[str, ...] = arg((), help="a context passage (repeat the flag for several); with contexts "
                                   "the yes/no/maybe probabilities are printed too")
    max_length: int = arg(256, help="prompt + generated tokens")
    tokenizer: str = arg("", help=TOKENIZER_HELP)
    device: str = arg("auto", choices=DEVICES, help="auto: the GPU if there is one, else the CPU")


@dataclass(frozen=True, kw_only=True)
class PlanRequest(Request):
    model: str = arg(help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a save_pretrained folder or a GPT2Config .json")
    gpus: int = arg(1, help="GPUs per node")
    nodes: int = arg(1, help="nodes (hosts), each with --gpus GPUs")
    gpu_mem: float = arg(80.0, help="GiB of memory per GPU")
    reserve: float = arg(4.0, help="GiB per GPU kept out of the budget: CUDA context, NCCL and DeepSpeed buckets, "
                         "allocator fragmentation")
    cpu_mem: float | None = arg(None, help="GiB of host memory per node; unset: host memory is not checked")
    micro_batch_size: int = arg(4, help="samples per GPU per micro-step, as medgpt's --micro_batch_size")
    seq_len: int = arg(1024, help="tokens per sample, as medgpt's --seq_len")
    precision: str = arg("bf16", choices=PRECISIONS, help="training precision, as medgpt's --precision")
    attention: str = arg("sdpa", choices=ATTENTIONS, help="sdpa (transformers' default: no seq_len x seq_len "
                         "scores kept) or eager")
    dropout: float = arg(0.1, help="as medgpt's --dropout (> 0 keeps masks)")
    label_tokens: int = arg(2, help="labelled tokens per sample (2: the decision and EOS; ~60 with --long_answer)")
    lora_r: int = arg(0, help="as medgpt's --lora_r: > 0 plans LoRA (frozen model, adapters trained); 0: full "
                      "fine-tuning")
    lora_targets: str = arg(",".join(LORA_TARGETS), help="as medgpt's --lora_targets")

    def problems(self) -> list[str]:
        problems = [f"--{name} must be >= 1 (got {getattr(self, name)})"
                    for name in ("gpus", "nodes", "micro_batch_size", "seq_len", "label_tokens")
                    if getattr(self, name) < 1]
        problems += lora_problems(ModelConfig(lora_r=self.lora_r, lora_targets=self.lora_targets), {})
        if not 0 < self.gpu_mem < math.inf:
            problems.append(f"--gpu_mem must be a finite number of GiB > 0 (got {self.gpu_mem})")
        elif not 0 <= self.reserve < self.gpu_mem:  # only against a valid --gpu_mem: blame the flag that is wrong
            problems.append(f"--reserve must be >= 0 and below --gpu_mem {self.gpu_mem} (got {self.reserve})")
        if self.cpu_mem is not None and not 0 < self.cpu_mem < math.inf:
            problems.append(f"--cpu_mem must be a finite number of GiB > 0 (got {self.cpu_mem})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        return problems


@dataclass(frozen=True, kw_only=True)
class ReportRequest(Request):
    folder: str = arg(help="a sweep folder (every folder under it that holds config.yaml is a run) or one "
                      "run's output_dir", positional=True)
    output_dir: str = arg("", help="folder for report.md, report.json and the PNG plots; empty: <folder>/report "
                          "(its report files are replaced)")

    def problems(self) -> list[str]:
        try:
            check_output_dir(self.report_dir, "--output_dir")
        except UserError as err:
            return err.problems
        return []

    @property
    def report_dir(self) -> Path:
        return Path(self.output_dir or Path(self.folder) / "report")
