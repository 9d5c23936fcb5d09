"""What ``launcher/evaluate.py`` does: answer a PubMedQA split with a saved model (or rescore an
existing predictions file) and write predictions.json + metrics.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from medgpt.commands import FALLBACK_SEQ_LEN, EvalRequest
from medgpt.config import ModelConfig
from medgpt.distributed import init_distributed
from medgpt.errors import UserError
from medgpt.lm_eval_task import FOLDER as LM_EVAL_FOLDER
from medgpt.lm_eval_task import lm_eval_command, write_lm_eval_task
from medgpt.metrics import answer_metrics, check_predictions, format_table
from medgpt.model import check_model_folder, load_saved_model, load_tokenizer
from medgpt.model_card import export_seq_len
from medgpt.pubmedqa import DECISIONS, Record, load_records, official_split
from medgpt.scoring import cut_contexts_line, evaluate_records, write_results


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
    """Print the metrics of --predictions (and write metrics.json when --output_dir is given)."""
    metrics = rescore_predictions(request)
    print(format_table(metrics, f"{request.predictions} on PubMedQA {request.split}"))
    if request.writes_output:
        request.results_dir.mkdir(parents=True, exist_ok=True)
        (request.results_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def evaluate_model(request: EvalRequest) -> None:
    """Answer the split with the saved model (sharded under torchrun); rank 0 writes the files."""
    check_model_folder(request.model)
    # An explicit --seq_len wins; else the export's own (medgpt/model_card.py), else the fallback.
    request = dataclasses.replace(request, seq_len=request.seq_len or export_seq_len(request.model)
                                  or FALLBACK_SEQ_LEN)
    records = split_records(request)
    # Under torchrun each rank scores a shard and all get every answer; alone, rank 0 of 1.
    dist = init_distributed(request.device, deepspeed_comm=False)
    model = load_saved_model(request.model, dist.device)
    tokenizer = load_tokenizer(ModelConfig(model=request.model, tokenizer=request.tokenizer))
    positions = getattr(model.config, "n_positions", request.seq_len)
    if request.seq_len > positions:
        raise UserError(f"seq_len {request.seq_len} is longer than the model's {positions} positions")
    evaluation = evaluate_records(model, tokenizer, records, dist, request.seq_len,
                                  request.eval_batch_size, request.mode, progress=dist.is_main)
    if dist.is_main:  # every rank holds all answers; one writes them
        metrics = {**evaluation.metrics, "split": request.split, "fold": request.fold, "mode": request.mode,
                   "model": request.model, "seq_len": request.seq_len}
        write_results(request.results_dir, records, evaluation, metrics)
        print(format_table(metrics, f"{request.model} on PubMedQA {request.split} ({request.mode})"))
        if line := cut_contexts_line(metrics, len(records)):
            print(line)
        also = ", metrics.json and probabilities.json" if evaluation.answers.probabilities else " and metrics.json"
        print(f"wrote {request.results_dir / 'predictions.json'}{also}")
        task = request.results_dir / LM_EVAL_FOLDER
        retokenized = write_lm_eval_task(task, records, evaluation.prompts, tokenizer)
        print(f"wrote these prompts as an lm-evaluation-harness task ({task}); score with:\n  "
              + lm_eval_command(request.model, task))
        if retokenized:
            print(f"medgpt: {retokenized} of {len(records)} prompts, cut inside a word, tokenize to other ids from "
                  "text: lm-eval may answer those differently (marked same_tokens: false)")
    torch.distributed.destroy_process_group()


def run_evaluation(request: EvalRequest) -> None:
    """What launcher/evaluate.py does with its checked request (medgpt.cli.parse_request)."""
    if request.predictions:
        report_rescored(request)
    else:
        evaluate_model(request)
