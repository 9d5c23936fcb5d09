"""What an export says about itself: a model card (``README.md`` in the Hugging Face format: YAML
metadata, then prose) and, in ``config.json``, the training facts a program needs (``"medgpt":
{"seq_len", "prompt_format", ...}``): launcher/evaluate.py takes its ``--seq_len`` default from there."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData

from medgpt.checkpoint import CheckpointMeta, describe_history
from medgpt.config import HUB_DATASET, Config
from medgpt.metrics import score_line
from medgpt.prompt import PROMPT_FORMAT_VERSION, answer_text, context_text, question_text

CONFIG_KEY = "medgpt"  # the export's config.json entry medgpt writes


def export_facts(meta: CheckpointMeta) -> dict[str, Any]:
    """The ``config.json`` entry of an export of the checkpoint with medgpt.json ``meta``."""
    data = meta.config.data
    return {"seq_len": data.seq_len, "prompt_format": PROMPT_FORMAT_VERSION, "fold": data.fold,
            "long_answer": data.long_answer, "step": meta.train_state.step}


def export_seq_len(model_folder: str) -> int | None:
    """The seq_len a medgpt export was trained with; None for any other model folder."""
    try:
        config = json.loads((Path(model_folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not a readable model folder: loading it reports that
    return config.get(CONFIG_KEY, {}).get("seq_len")


def _base_model(model: str) -> str | None:
    """A Hub name the run started from; None for a random init (.json config) or a local folder."""
    return None if model.endswith(".json") or Path(model).exists() else model


def card_metadata(name: str, meta: CheckpointMeta, test: dict[str, Any] | None) -> ModelCardData:
    """The card's YAML header; its model-index holds the test scores and the majority baseline."""
    results = []
    if test:
        base = test["majority_baseline"]
        scores = [("accuracy", test["accuracy"], "Accuracy"), ("f1", test["macro_f1"], "Macro-F1"),
                  ("accuracy", base["accuracy"], f"Majority baseline accuracy (always '{base['label']}')"),
                  ("f1", base["macro_f1"], f"Majority baseline macro-F1 (always '{base['label']}')")]
        results = [EvalResult(task_type="question-answering", task_name="PubMedQA yes/no/maybe",
                              dataset_type=HUB_DATASET, dataset_name="PubMedQA (pqa_labeled)",
                              dataset_config="pqa_labeled", dataset_split="test (official 500 questions)",
                              metric_type=kind, metric_value=value, metric_name=label,
                              metric_args={"average": "macro"} if kind == "f1" else None)
                   for kind, value, label in scores]
    # GPT-2's weights and PubMedQA are both MIT-licensed (their Hub cards), as medgpt is.
    return ModelCardData(language="en", license="mit", library_name="transformers", pipeline_tag="text-generation",
                         tags=["medgpt", "gpt2", "pubmedqa", "biomedical", "deepspeed"], datasets=[HUB_DATASET],
                         base_model=_base_model(meta.config.model.model), model_name=name,
                         eval_results=results or None)


def _prompt_section(facts: dict[str, Any]) -> str:
    template = context_text(["<contexts, joined by spaces>"]) + question_text("<question>")
    completion = answer_text("yes|no|maybe", "<long answer>" if facts["long_answer"] else "")
    return (f"## Prompt format (version {facts['prompt_format']})\n\n```\n{template}\n```\n\n"
            f"The model continues with `{completion}` and then EOS. Prompt and answer together are at most "
            f"{facts['seq_len']} tokens (seq_len): a longer prompt loses the end of its contexts, never the "
            "question. Only the answer tokens were trained on.\n")


def _usage_section(folder: Path) -> str:
    return ("## Use\n\n```python\nfrom transformers import pipeline\n\n"
            f"generate = pipeline(\"text-generation\", model=\"{folder}\")\n"
            "prompt = \"Context: Aspirin irreversibly inhibits platelet cyclooxygenase.\\n"
            "Question: Does aspirin prevent stroke?\\nAnswer:\"\n"
            "answer = generate(prompt, max_new_tokens=1, do_sample=False, return_full_text=False)\n"
            "print(answer[0][\"generated_text\"])  # ' yes', ' no' or ' maybe'\n"
            "```\n\nWith medgpt: `python launcher/evaluate.py --model <this folder>` scores a PubMedQA split "
            "(its `--seq_len` defaults to this export's), `python launcher/generate.py --model <this folder> "
            "\"<question>\" --context \"<context>\"` answers one question.\n")


def _data_row(cfg: Config) -> str:
    """What the run trained and chose on, for either subset (the test set is pqa_labeled's official one)."""
    d = cfg.data
    if d.subset == "pqa_labeled":
        return f"{d.data}, PubMedQA pqa_labeled, official split, fold {d.fold}: 450 training / 50 dev questions"
    return (f"{d.data}, PubMedQA pqa_artificial: every question trains but a 1% dev slice chosen by pubid hash "
            "(no fold); test: pqa_labeled's official 500 questions")


def _training_section(meta: CheckpointMeta, facts: dict[str, Any]) -> str:
    cfg, shape = meta.config, meta.model_shape
    rows = [("model", f"{cfg.model.model} ({shape.n_layer} layers, width {shape.n_embd}, {shape.n_head} heads)"),
            ("data", _data_row(cfg)),
            ("steps", f"{facts['step']} optimizer steps of {meta.global_batch} "
                      f"{'packed rows' if cfg.data.packing else 'questions'}"),
            ("precision, ZeRO", f"{cfg.train.precision}, ZeRO-{meta.zero_stage} on {meta.world_size} rank(s)"),
            ("seq_len", str(facts["seq_len"]))]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    changed = "".join(f"- {line}\n" for line in describe_history(meta.history))
    history = (f"\nSettings changed when the run resumed (the value before the arrow trained the steps "
               f"before):\n\n{changed}" if changed else "")
    return (f"## Training\n\n| | |\n| --- | --- |\n{table}\n\nThe whole medgpt configuration (the last "
            f"values):\n\n```yaml\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```\n{history}")


def _provenance_section(provenance: dict[str, Any]) -> str:
    if not provenance:
        return ""  # a checkpoint from before it was recorded
    versions = ", ".join(f"{name} {version}" for name, version in provenance["versions"].items() if version)
    source = provenance.get("source")
    commit = (f"medgpt commit {source['commit'][:12]}{' with uncommitted changes' if source['dirty'] else ''}"
              if source else "medgpt outside a git checkout")
    devices = ", ".join(f"{count} x {name}" for name, count in provenance["devices"].items())
    return (f"## Provenance\n\nTrained (its last part) with {versions}; {commit}; on {devices} "
            f"(host(s) {', '.join(provenance['hosts'])}).\n")


def _results_section(test: dict[str, Any] | None) -> str:
    if not test:
        return ("## Test results\n\nNot scored: this checkpoint's run did not score the test set. "
                "`python launcher/evaluate.py --model <this folder>` does.\n")
    return (f"## Test results\n\nThe official 500 PubMedQA test questions, log-likelihood scoring: "
            f"{score_line(test)}.\n")


def write_model_card(folder: Path, meta: CheckpointMeta, tag_dir: Path, test: dict[str, Any] | None) -> None:
    """README.md of the export in ``folder``, made from the checkpoint ``tag_dir``, its ``meta`` and the
    test scores of its weights (None: not scored)."""
    facts = export_facts(meta)
    body = (f"# {folder.name}\n\nGPT-2 fine-tuned with medgpt (DeepSpeed) to answer PubMedQA questions "
            f"yes, no or maybe, exported from {tag_dir}.\n\n"
            + "\n".join(part for part in [_prompt_section(facts), _usage_section(folder),
                                           _training_section(meta, facts), _provenance_section(meta.provenance),
                                           _results_section(test)] if part))
    metadata = card_metadata(folder.name, meta, test).to_yaml()
    (folder / "README.md").write_text(f"---\n{metadata}\n---\n\n{body}")
