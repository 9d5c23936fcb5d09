"""The questions medgpt scored, in medgpt's prompt, as an lm-evaluation-harness task, so that a
model can be scored by the field's evaluator on exactly what launcher/evaluate.py scored.

lm-eval's built-in ``pubmedqa`` task is no substitute: it scores all 1,000 pqa_labeled questions
(``test_split: train``), the 450 of every training fold among them, in a prompt of its own.

The task holds each prompt as text, its contexts already cut to the seq_len medgpt scored at:
lm-eval would otherwise cut long prompts from the left (losing the question) instead of cutting
the contexts. lm-eval tokenizes the text again; a prompt cut in the middle of a word can come back
as other token ids (2 of the 500 test prompts at seq_len 256, none at 384, 512 or 1024 with the
GPT-2 tokenizer): those are counted and marked (``same_tokens``). The choices are medgpt's answers
" yes", " no", " maybe" (one token each), so lm-eval's ``acc`` picks the likeliest of the three
exactly as medgpt's log-likelihood scoring does.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from medgpt.prompt import Encoded
from medgpt.pubmedqa import DECISIONS, Record

TASK = "pubmedqa_medgpt"
FOLDER = "lm_eval_task"  # inside evaluate.py's --output_dir


def task_yaml(data_file: Path) -> str:
    """lm-eval's task config: multiple choice over the decisions, after the prompt text."""
    choices = json.dumps(list(DECISIONS))
    return (f"task: {TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file.resolve()))}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{prompt}}"\n'
            f"doc_to_choice: {choices}\n"
            "doc_to_target: label\n"
            'target_delimiter: " "\n'  # "Answer:" + " " + "yes": medgpt's answer token " yes"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def write_lm_eval_task(folder: Path, records: list[Record], prompts: list[Encoded],
                       tokenizer: PreTrainedTokenizerBase) -> int:
    """``folder/<TASK>.yaml`` and ``folder/test.jsonl`` (pubid, prompt, label, same_tokens);
    returns how many prompts' text tokenizes to other ids than medgpt scored."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for record, prompt in zip(records, prompts, strict=True):
        text = tokenizer.decode(prompt.input_ids)
        rows.append({"pubid": record.pubid, "prompt": text, "label": DECISIONS.index(record.final_decision),
                     "same_tokens": tokenizer(text)["input_ids"] == prompt.input_ids})
    data_file = folder / "test.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(task_yaml(data_file))
    return sum(1 for row in rows if not row["same_tokens"])


def lm_eval_command(model: str, folder: Path) -> str:
    """The command line that scores ``model`` on the task in ``folder``."""
    return (f"lm_eval --model hf --model_args pretrained={model} --include_path {folder} --tasks {TASK} "
            "--log_samples --output_path <folder>")
