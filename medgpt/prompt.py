"""The one prompt format. Training, evaluation and inference all encode through
:func:`encode_example`, so the model is always asked the way it was taught."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from medgpt.errors import UserError

IGNORE_INDEX = -100  # label of positions that carry no loss (the prompt, padding)
# Bump when the prompt format or its tokenization changes: it invalidates cached datasets
# (medgpt/data.py) and tells an export's users which format its model was trained on.
PROMPT_FORMAT_VERSION = 1


def context_text(contexts: Sequence[str]) -> str:
    return "Context: " + " ".join(c.strip() for c in contexts)


def question_text(question: str) -> str:
    return f"\nQuestion: {question.strip()}\nAnswer:"


def answer_text(decision: str, long_answer: str = "") -> str:
    """The completion after "Answer:": " yes" (a single GPT-2 token), optionally ". <long answer>"."""
    return f" {decision}" + (f". {long_answer.strip()}" if long_answer.strip() else "")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions; the answer tokens (and EOS) otherwise
    context_cut: int = 0  # context tokens left out to fit max_len


def encode_pieces(context_ids: list[int], question_ids: list[int], answer_ids: list[int] | None,
                  eos_id: int, max_len: int) -> Encoded:
    """Join already-tokenized pieces; cut the contexts (never the question or answer) to fit."""
    completion = [] if answer_ids is None else [*answer_ids, eos_id]
    room = max_len - len(question_ids) - len(completion)
    if room < 0:
        raise UserError(f"question and answer alone take {len(question_ids) + len(completion)} tokens, "
                        f"more than seq_len={max_len}; raise --seq_len")
    prompt = context_ids[:room] + question_ids
    return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, max(0, len(context_ids) - room))


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str, contexts: Sequence[str],
                   answer: str | None, max_len: int) -> Encoded:
    """Token ids and loss labels of one example; ``answer=None`` gives the prompt alone."""
    context_ids = tokenizer.encode(context_text(contexts)) if contexts else []
    answer_ids = None if answer is None else tokenizer.encode(answer)
    return encode_pieces(context_ids, tokenizer.encode(question_text(question)), answer_ids,
                         tokenizer.eos_token_id, max_len)
