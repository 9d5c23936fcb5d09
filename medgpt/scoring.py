"""Answer PubMedQA questions with a model, sharded over ranks.

Log-likelihood scoring (the default): after the training prompt, the answer is whichever of the
single tokens " yes", " no", " maybe" gets the highest logit at the last prompt position.
Generative scoring: greedy decoding after the same prompt, answer = the first generated word.
Both take a plain Hugging Face model or a DeepSpeed engine; every rank runs the same number of
forwards (ZeRO-3 needs all ranks in each) and every rank gets all answers back in record order.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from medgpt.data import eval_loader, eval_positions, shard_positions, to_device
from medgpt.distributed import Dist
from medgpt.errors import UserError
from medgpt.metrics import answer_metrics
from medgpt.prompt import Encoded, answer_text, encode_example
from medgpt.pubmedqa import DECISIONS, Record

# Generative mode stops after this many new tokens: the decision is the first word.
ANSWER_NEW_TOKENS = 8


@dataclass(frozen=True)
class Answers:
    decisions: list[str | None]  # record order; None: a generated answer that names no decision
    probabilities: list[list[float]] | None  # loglik only: P(yes), P(no), P(maybe) over the three
    generated: list[str] | None  # generate only: the generated text


@dataclass(frozen=True)
class Evaluation:
    answers: Answers
    metrics: dict[str, Any]
    prompts: list[Encoded]  # what was scored, per record (launcher/evaluate.py's lm-eval task)

    def predictions(self, records: list[Record]) -> dict[str, str | None]:
        """The official predictions format: {pmid: decision}."""
        return {r.pubid: d for r, d in zip(records, self.answers.decisions, strict=True)}


def decision_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of " yes", " no", " maybe" (in DECISIONS order), each a single token."""
    ids = [tokenizer.encode(answer_text(d)) for d in DECISIONS]
    if any(len(i) != 1 for i in ids):
        raise UserError("the tokenizer splits ' yes', ' no' or ' maybe' into several tokens; "
                        "log-likelihood scoring needs a GPT-2 tokenizer")
    return [i[0] for i in ids]


def prompts(records: list[Record], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Encoded]:
    """The training prompt of each record, truncated exactly as in training: room is left for the
    decision token and EOS, the completion of a decision-only sample."""
    return [encode_example(tokenizer, r.question, r.contexts, None, max_len=seq_len - 2) for r in records]


def parse_decision(text: str) -> str | None:
    """The first word of a generated answer if it is yes/no/maybe (any case), else None."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words and words[0] in DECISIONS else None


def decision_probabilities(model: Callable[..., Any], batch: dict[str, torch.Tensor],
                           decision_ids: list[int]) -> torch.Tensor:
    """[rows, 3] softmax over the three decision logits at each row's last real position."""
    last = batch["attention_mask"].sum(dim=1) - 1  # rows are right-padded
    # The LM head (vocabulary-wide: most of a small model's cost) runs at each row's own last
    # position only: a 2-D logits_to_keep holds positions per row (transformers'
    # modeling_utils.slice_logits_to_keep).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=last[:, None]).logits[:, 0]
    return logits[:, decision_ids].float().softmax(dim=-1)


def _gather_in_order(local: Iterable[tuple[int, Any]], dist: Dist) -> list[Any]:
    """(position, value) pairs from every rank -> values ordered by position."""
    return [value for _, value in sorted(pair for part in dist.all_gather_objects(list(local)) for pair in part)]


@torch.no_grad()
def score_loglik(model: Any, rows: list[dict[str, list[int]]], dist: Dist, batch_size: int, pad_id: int,
                 decision_ids: list[int], progress: bool = False) -> Answers:
    """Log-likelihood answers to prompt ``rows`` (every rank: its shard, same number of forwards)."""
    was_training = model.training
    model.eval()
    positions = iter(eval_positions(rows, dist))
    local = []
    for batch in tqdm(eval_loader(rows, dist, batch_size, pad_id), desc="score", unit="batch", disable=not progress):
        batch = to_device(batch, dist.device)
        for probs in decision_probabilities(model, batch, decision_ids).tolist():
            local.append((next(positions), probs))
    model.train(was_training)
    probabilities = _gather_in_order(((pos, p) for pos, p in local if pos < len(rows)), dist)
    decisions = [DECISIONS[p.index(max(p))] for p in probabilities]
    return Answers(decisions=decisions, probabilities=probabilities, generated=None)


@torch.no_grad()
def score_generate(model: Any, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, list[int]]], dist: Dist,
                   seq_len: int, progress: bool = False) -> Answers:
    """Greedy decoding one question at a time (no padding to get wrong). Meant for a plain model
    on each rank: ranks do not need to stay in step."""
    was_training = model.training
    model.eval()
    local = []
    shard = [pos for pos in shard_positions(len(rows), dist) if pos < len(rows)]
    for pos in tqdm(shard, desc="generate", unit="question", disable=not progress):
        prompt = torch.tensor([rows[pos]["input_ids"]], device=dist.device)
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=min(ANSWER_NEW_TOKENS, seq_len - prompt.shape[1]),
                                pad_token_id=tokenizer.eos_token_id)
        local.append((pos, tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)))
    model.train(was_training)
    generated = _gather_in_order(local, dist)
    return Answers(decisions=[parse_decision(t) for t in generated], probabilities=None, generated=generated)


def evaluate_records(model: Any, tokenizer: PreTrainedTokenizerBase, records: list[Record], dist: Dist,
                     seq_len: int, batch_size: int, mode: str = "loglik", progress: bool = False) -> Evaluation:
    """Answer every record and score the answers against their final_decision (all ranks
    take part and all get the result)."""
    encoded = prompts(records, tokenizer, seq_len)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    if mode == "loglik":
        answers = score_loglik(model, rows, dist, batch_size, tokenizer.eos_token_id, decision_token_ids(tokenizer),
                               progress)
    else:
        answers = score_generate(model, tokenizer, rows, dist, seq_len, progress)
    metrics = answer_metrics([r.final_decision for r in records], answers.decisions)
    # Scores of prompts whose contexts were cut are scores of less evidence: said, with the seq_len.
    metrics["contexts_cut"] = {"prompts": sum(1 for e in encoded if e.context_cut), "seq_len": seq_len}
    return Evaluation(answers, metrics, encoded)


def metric_scalars(evaluation: Evaluation, prefix: str) -> dict[str, float]:
    """TensorBoard scalars of an evaluation: ``<prefix>/accuracy``, ``<prefix>/macro_f1`` and, beside
    them, ``<prefix>/majority_accuracy``, ``<prefix>/majority_macro_f1`` (always the commonest answer)."""
    base = evaluation.metrics["majority_baseline"]
    return {f"{prefix}/{kind}{name}": scores[name] for kind, scores in (("", evaluation.metrics), ("majority_", base))
            for name in ("accuracy", "macro_f1")}


def write_results(output_dir: Path, records: list[Record], evaluation: Evaluation, metrics: dict[str, Any],
                  prefix: str = "") -> None:
    """``<prefix>predictions.json`` ({pmid: decision}, the official format), ``<prefix>metrics.json`` and,
    for log-likelihood scoring, ``<prefix>probabilities.json`` ({pmid: {yes, no, maybe}}: near-ties and
    comparisons between models without rerunning them)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{prefix}predictions.json").write_text(json.dumps(evaluation.predictions(records), indent=1))
    (output_dir / f"{prefix}metrics.json").write_text(json.dumps(metrics, indent=2))
    probabilities = evaluation.answers.probabilities
    if probabilities is not None:
        (output_dir / f"{prefix}probabilities.json").write_text(json.dumps(
            {r.pubid: dict(zip(DECISIONS, p, strict=True)) for r, p in zip(records, probabilities, strict=True)},
            indent=1))


def cut_contexts_line(metrics: dict[str, Any], total: int) -> str | None:
    """The console line for prompts whose contexts did not fit (None: all fitted)."""
    cut = metrics["contexts_cut"]
    if not cut["prompts"]:
        return None
    return (f"medgpt: {cut['prompts']} of {total} prompts had their contexts cut to fit seq_len {cut['seq_len']} "
            "(the question never is); their answers rest on less evidence")
