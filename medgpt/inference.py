"""Answer one free-text question with a saved model on one device, through the training prompt."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medgpt.config import ModelConfig
from medgpt.distributed import choose_device
from medgpt.errors import UserError
from medgpt.model import load_saved_model, load_tokenizer
from medgpt.prompt import encode_example
from medgpt.pubmedqa import DECISIONS
from medgpt.scoring import decision_probabilities, decision_token_ids


def check_question(question: str) -> None:
    if not question.strip():
        raise UserError("the question is empty; pass the question text, e.g. \"Does aspirin prevent stroke?\"")


@dataclass(frozen=True)
class Answer:
    text: str  # what the model generated after the prompt
    probabilities: dict[str, float] | None  # P(yes/no/maybe) at the answer position; with contexts only

    @property
    def decision(self) -> str | None:
        return None if self.probabilities is None else max(self.probabilities, key=self.probabilities.__getitem__)


@torch.no_grad()
def answer_question(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
                    contexts: Sequence[str], max_length: int) -> Answer:
    """Greedy answer to ``question`` (contexts cut so the prompt leaves room for one token), plus
    the three decision probabilities when contexts are given (the setting the model was trained in)."""
    if not question.strip():
        raise UserError("the question is empty; pass the question text, e.g. \"Does aspirin prevent stroke?\"")
    # The ids themselves, not their text re-tokenized: BPE may merge across the prompt's pieces.
    prompt = encode_example(tokenizer, question, contexts, None, max_len=max_length - 1).input_ids
    input_ids = torch.tensor([prompt], device=model.device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    output = model.generate(**inputs, max_length=max_length, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)
    if not contexts:
        return Answer(text=text, probabilities=None)
    probs = decision_probabilities(model, inputs, decision_token_ids(tokenizer))[0].tolist()
    return Answer(text=text, probabilities=dict(zip(DECISIONS, probs, strict=True)))


def run_generate(model_folder: str, question: str, contexts: Sequence[str], max_length: int,
                 tokenizer_name: str = "", device: str = "auto") -> Answer:
    """What ``launcher/generate.py`` does: load, answer, print."""
    check_question(question)  # before the slow part
    model = load_saved_model(model_folder, choose_device(device, local_rank=0))
    tokenizer = load_tokenizer(ModelConfig(model=model_folder, tokenizer=tokenizer_name))
    positions = getattr(model.config, "n_positions", max_length)
    if not 2 <= max_length <= positions:
        raise UserError(f"max_length must be 2..{positions}, the model's positions (got {max_length})")
    answer = answer_question(model, tokenizer, question, contexts, max_length)
    print(answer.text.strip())
    if answer.probabilities is not None:
        probs = "  ".join(f"{d} {p:.3f}" for d, p in answer.probabilities.items())
        print(f"decision: {answer.decision}  ({probs})")
    return answer
