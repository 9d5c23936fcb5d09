"""What ``launcher/evaluate.py`` does: answer a PubMedQA split with a saved model (or rescore an
existing predictions file) and write predictions.json + metrics.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgpt.answer_metrics import answer_metrics, check_predictions, format_table
from medgpt.config import HUB_DATASET, ModelConfig
from medgpt.distributed import init_distributed
from medgpt.errors import UserError
from medgpt.evaluate import evaluate_records, write_results
from medgpt.model import check_model_folder, load_saved_model, load_tokenizer
from medgpt.outputs import check_new_output_dir, check_output_dir
from medgpt.pubmedqa import DECISIONS, NUM_FOLDS, Record, load_records, official_split

SPLITS = ("test", "dev")
MODES = ("loglik", "generate")


@dataclass(frozen=True)
class EvalRequest:
    model: str = ""  # save_pretrained folder
    split: str = "test"  # the official 500 test questions, or dev = CV fold `fold`
    fold: int = 0
    data: str = HUB_DATASET
    tokenizer: str = ""  # empty: the model folder's own
    output: str = ""  # empty: runs/eval-<split>
    device: str = "auto"  # auto (this rank's GPU if there is one) | cuda | cpu
    batch_size: int = 8
    seq_len: int = 1024
    mode: str = "loglik"
    predictions: str = ""  # rescore this predictions.json instead of running a model
    overwrite: bool = False  # write into a non-empty output folder (else refused: nothing is overwritten)

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"split '{self.split}' is unknown; use one of {', '.join(SPLITS)}")
        if not 0 <= self.fold < NUM_FOLDS:
            raise UserError(f"fold must be 0..{NUM_FOLDS - 1}, one of the 10 official folds (got {self.fold})")
        if self.mode not in MODES:
            raise UserError(f"mode '{self.mode}' is unknown; use one of {', '.join(MODES)}")
        if self.batch_size < 1 or self.seq_len < 32:
            raise UserError(f"batch_size must be >= 1 and seq_len >= 32 (got {self.batch_size}, {self.seq_len})")
        if not self.model and not self.predictions:
            raise UserError("pass --model <saved model folder>, or --predictions <file> to rescore one")
        if self.writes_output and self.overwrite:
            check_output_dir(self.output_dir, "--output")
        elif self.writes_output:
            check_new_output_dir(self.output_dir, "--output", overwrite_hint=", or --overwrite to replace its results")

    @property
    def writes_output(self) -> bool:
        """Rescoring writes metrics.json only where --output is given."""
        return bool(self.output) or not self.predictions

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/eval-{self.split}")


def split_records(request: EvalRequest) -> list[Record]:
    records = load_records(request.data)
    return [records[i] for i in getattr(official_split(records, request.fold), request.split)]


def _read_predictions(path: str) -> dict[str, Any]:
    try:
        predictions = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read predictions '{path}' ({type(err).__name__}: {err})") from None
    if not isinstance(predictions, dict):
        raise UserError(f"predictions '{path}' must be a JSON object {{pmid: yes|no|maybe}}")
    return predictions


def rescore_predictions(request: EvalRequest) -> dict[str, Any]:
    """Metrics of an existing predictions file against the split's gold labels; an answer other
    than yes/no/maybe counts as wrong (unparsed)."""
    records = split_records(request)
    predictions = _read_predictions(request.predictions)
    check_predictions(predictions, {r.pubid: r.final_decision for r in records}, request.predictions)
    answers = [predictions[r.pubid] if predictions[r.pubid] in DECISIONS else None for r in records]
    return answer_metrics([r.final_decision for r in records], answers)


def report_rescored(request: EvalRequest) -> None:
    """Print the metrics of --predictions (and write metrics.json when --output is given)."""
    metrics = rescore_predictions(request)
    print(format_table(metrics, f"{request.predictions} on PubMedQA {request.split}"))
    if request.writes_output:
        request.output_dir.mkdir(parents=True, exist_ok=True)
        (request.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def evaluate_model(request: EvalRequest) -> None:
    """Answer the split with the saved model (sharded under torchrun); rank 0 writes the files."""
    check_model_folder(request.model)
    records = split_records(request)
    # Under torchrun each rank scores a shard and all get every answer; alone, rank 0 of 1.
    dist = init_distributed(request.device, deepspeed_comm=False)
    model = load_saved_model(request.model, dist.device)
    tokenizer = load_tokenizer(ModelConfig(model=request.model, tokenizer=request.tokenizer))
    positions = getattr(model.config, "n_positions", request.seq_len)
    if request.seq_len > positions:
        raise UserError(f"seq_len {request.seq_len} is longer than the model's {positions} positions")
    evaluation = evaluate_records(model, tokenizer, records, dist, request.seq_len,
                                  request.batch_size, request.mode, progress=dist.is_main)
    if dist.is_main:  # every rank holds all answers; one writes them
        metrics = {**evaluation.metrics, "split": request.split, "fold": request.fold, "mode": request.mode,
                   "model": request.model, "seq_len": request.seq_len}
        write_results(request.output_dir, evaluation.predictions(records), metrics)
        print(format_table(metrics, f"{request.model} on PubMedQA {request.split} ({request.mode})"))
        print(f"wrote {request.output_dir / 'predictions.json'} and metrics.json")
    torch.distributed.destroy_process_group()


def run_evaluation(request: EvalRequest) -> None:
    request.validate()
    if request.predictions:
        report_rescored(request)
    else:
        evaluate_model(request)
