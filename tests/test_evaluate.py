"""Evaluation and inference: metrics against hand-computed values, the real launchers on a saved
tiny model (1 process and 2 ranks), a model over-fitted to known answers, bad input, training."""
import json
import math
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from conftest import (
    EVALUATE_PY,
    GROUND_TRUTH,
    ORI_JSON,
    REPO,
    TINY_MODEL,
    TOKENIZER,
    check_ok,
    checkout_commit,
    launch,
    launch_env,
    read_scalars,
    tensorboard_text,
    tiny_args,
)
from medgpt.config import RECORD_KEYS
from medgpt.data import collate
from medgpt.inference import answer_question
from medgpt.lm_eval_task import write_lm_eval_task
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.metrics import answer_metrics, majority_label
from medgpt.model import load_saved_model
from medgpt.model_card import export_seq_len
from medgpt.prompt import PROMPT_FORMAT_VERSION, answer_text, context_text, encode_example, question_text
from medgpt.pubmedqa import load_records, official_split
from medgpt.scoring import parse_decision, prompts

GENERATE_PY = str(REPO / "launcher" / "generate.py")
SEQ_LEN = 384


# --- Metrics: hand-computed references (what sklearn's f1_score(average="macro",
# labels=["yes", "no", "maybe"], zero_division=0) gives).

def test_metrics_with_a_class_never_predicted():
    gold = ["yes", "yes", "yes", "no", "no", "maybe"]
    pred = ["yes", "no", "yes", "no", "yes", "no"]
    m = answer_metrics(gold, pred)
    assert m["num_questions"] == 6 and m["accuracy"] == pytest.approx(3 / 6) and m["unparsed"] == 0
    # yes: TP 2 of 3 predicted, 3 gold; no: TP 1 of 3 predicted, 2 gold; maybe: never predicted.
    assert m["per_class"]["yes"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["no"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2})
    assert m["per_class"]["maybe"] == pytest.approx({"precision": 0, "recall": 0, "f1": 0, "support": 1})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 5 + 0) / 3)  # maybe's F1 of 0 counts
    assert m["confusion_matrix"]["counts"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    # Always "yes": accuracy 3/6; F1(yes) = 2*3 / (6 + 3), the others 0.
    assert m["majority_baseline"] == pytest.approx({"label": "yes", "accuracy": 0.5, "macro_f1": (2 / 3) / 3})


def test_metrics_count_unparsed_answers_as_wrong():
    gold = ["yes", "no", "maybe", "maybe"]
    pred = [None, "no", "maybe", "yes"]
    m = answer_metrics(gold, pred)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1
    assert m["per_class"]["yes"]["f1"] == 0  # one wrong "yes", and the gold "yes" went unparsed
    assert m["per_class"]["maybe"] == pytest.approx({"precision": 1, "recall": 1 / 2, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0 + 1 + 2 / 3) / 3)
    assert m["confusion_matrix"]["counts"] == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m["majority_baseline"] == pytest.approx({"label": "maybe", "accuracy": 0.5, "macro_f1": (4 / 6) / 3})


def test_majority_ties_and_answer_parsing():
    assert majority_label(["no", "maybe"]) == "no" and majority_label(["maybe", "no", "no", "yes"]) == "no"
    assert [parse_decision(t) for t in (" Yes. It", "\nNO", " maybe,", " perhaps yes", "", "...")] == \
        ["yes", "no", "maybe", None, None, None]


# --- A tiny model over-fitted to 6 questions (mixed labels: 3 of the test set, 3 of dev fold 0).

def short_records(records, positions, tokenizer):
    """One record per decision whose whole prompt fits SEQ_LEN, so no context is cut anywhere."""
    def fits(r):
        return len(encode_example(tokenizer, r.question, r.contexts, None, 10**6).input_ids) <= 300
    return [next(records[i] for i in positions if records[i].final_decision == d and fits(records[i]))
            for d in ("yes", "no", "maybe")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(saved model folder, trained test records, trained dev records): plain PyTorch, full batch,
    the training labels of encode_example, until the answers are learnt (~10 s)."""
    records = load_records(str(ORI_JSON))
    split = official_split(records, fold=0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    test_records, dev_records = (short_records(records, split.test, tokenizer),
                                 short_records(records, split.dev, tokenizer))
    transformers.set_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config.from_json_file(TINY_MODEL))
    encoded = [encode_example(tokenizer, r.question, r.contexts, answer_text(r.final_decision), SEQ_LEN)
               for r in test_records + dev_records]
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded], tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        loss = label_loss_sum(model, batch) / count_label_tokens(batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.02, "the tiny model did not learn its 6 answers"
    folder = tmp_path_factory.mktemp("trained") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, test_records, dev_records


def evaluate(model, out, *extra, launcher="python", nproc=1):
    args = ["--model", str(model), "--data", str(ORI_JSON), "--seq_len", str(SEQ_LEN), "--output_dir", str(out), *extra]
    return launch(args, launcher=launcher, nproc=nproc, script=EVALUATE_PY)


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def test_split_run(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-test")
    proc = evaluate(trained[0], out, "--eval_batch_size", "8")
    check_ok(proc)
    return out, proc


def test_lm_eval_task_marks_prompts_that_tokenize_otherwise_from_text(tmp_path):
    """At seq_len 256, two official test prompts are cut inside a word: their text comes back as
    other token ids. Every row is checked against the tokenizer here, independently of the writer."""
    records = load_records(str(ORI_JSON))
    test = [records[i] for i in official_split(records, fold=0).test]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    encoded = prompts(test, tokenizer, 256)
    assert write_lm_eval_task(tmp_path, test, encoded, tokenizer) == 2
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [row["pubid"] for row in rows] == [r.pubid for r in test]
    for row, prompt, record in zip(rows, encoded, test, strict=True):
        assert tokenizer.decode(prompt.input_ids) == row["prompt"]
        assert row["same_tokens"] == (tokenizer(row["prompt"])["input_ids"] == prompt.input_ids)
        assert ("yes", "no", "maybe")[row["label"]] == record.final_decision
    assert sum(not row["same_tokens"] for row in rows) == 2
    task = yaml.safe_load((tmp_path / "pubmedqa_medgpt.yaml").read_text())
    assert task["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "test.jsonl").resolve())
    assert (task["doc_to_choice"], task["target_delimiter"]) == (["yes", "no", "maybe"], " ")


@pytest.mark.e2e
def test_lm_eval_scores_the_written_task_as_medgpt_does(trained, tmp_path):
    """lm-evaluation-harness on the task evaluate.py writes: the official test questions, the
    same answer to each, and the same three probabilities (lm-eval's log-likelihoods, renormalised
    over the three answers). lm-eval computes the vocabulary-wide logits of every position (1.5 min
    for all 500 here): the first 100 questions (--limit), at seq_len 128, where every test prompt is
    cut (496 of 500) and none re-tokenizes otherwise. Different batches pad differently: fp32 sums
    in another order, 1e-4."""
    out = tmp_path / "eval"
    proc = evaluate(trained[0], out, "--seq_len", "128")
    check_ok(proc)
    task = out / "lm_eval_task"
    assert f"--include_path {task} --tasks pubmedqa_medgpt" in proc.stdout
    assert "tokenize to other ids" not in proc.stdout
    lm_eval = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={trained[0]},dtype=float32", "--include_path", str(task), "--tasks", "pubmedqa_medgpt",
               "--device", "cpu", "--batch_size", "32", "--limit", "100", "--log_samples",
               "--output_path", str(tmp_path / "lm_eval")]
    run = subprocess.run(lm_eval, env=launch_env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "lm_eval").rglob("samples_pubmedqa_medgpt_*.jsonl")
               for line in path.read_text().splitlines()]
    want = read_json(out / "probabilities.json")
    task_rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()]
    assert sorted(row["pubid"] for row in task_rows) == sorted(want) and len(task_rows) == 500
    assert [s["doc"]["pubid"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [
        row["pubid"] for row in task_rows[:100]]
    predictions = read_json(out / "predictions.json")
    for sample in samples:
        logliks = torch.tensor([float(loglik) for loglik, _ in sample["filtered_resps"]], dtype=torch.float64)
        got = dict(zip(("yes", "no", "maybe"), logliks.softmax(dim=0).tolist(), strict=True))
        pubid = sample["doc"]["pubid"]
        assert got == pytest.approx(want[pubid], abs=1e-4), pubid
        assert ("yes", "no", "maybe")[int(logliks.argmax())] == predictions[pubid], pubid


@pytest.mark.e2e
def test_predictions_hold_exactly_the_official_test_pmids(test_split_run):
    out, proc = test_split_run
    predictions, metrics = read_json(out / "predictions.json"), read_json(out / "metrics.json")
    assert predictions.keys() == read_json(GROUND_TRUTH).keys() and len(predictions) == 500
    assert set(predictions.values()) <= {"yes", "no", "maybe"}
    assert metrics["num_questions"] == 500 and metrics["split"] == "test" and metrics["unparsed"] == 0
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == 500
    assert "macro-F1" in proc.stdout and "majority baseline" in proc.stdout


@pytest.mark.e2e
def test_evaluation_writes_its_probabilities_and_says_which_contexts_it_cut(test_split_run):
    """Before: the three probabilities were computed and dropped, and the cut prompts went unmentioned."""
    out, proc = test_split_run
    predictions, probabilities = read_json(out / "predictions.json"), read_json(out / "probabilities.json")
    assert probabilities.keys() == predictions.keys()
    for pmid, probs in probabilities.items():
        assert list(probs) == ["yes", "no", "maybe"] and math.isclose(sum(probs.values()), 1, rel_tol=1e-5)
        assert max(probs, key=probs.get) == predictions[pmid]
    # An independent count: the prompts whose contexts and question exceed seq_len minus the answer's 2.
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    records = load_records(str(ORI_JSON))
    test = [records[i] for i in official_split(records, 0).test]
    cut = sum(len(tokenizer.encode(context_text(r.contexts))) + len(tokenizer.encode(question_text(r.question)))
              > SEQ_LEN - 2 for r in test)
    assert 0 < cut < 500
    assert read_json(out / "metrics.json")["contexts_cut"] == {"prompts": cut, "seq_len": SEQ_LEN}
    assert (f"medgpt: {cut} of 500 prompts had their contexts cut to fit seq_len {SEQ_LEN} (the question never "
            "is); their answers rest on less evidence") in proc.stdout


@pytest.mark.e2e
def test_loglik_scorer_gives_the_trained_answers(trained, test_split_run):
    _, test_records, _ = trained
    predictions = read_json(test_split_run[0] / "predictions.json")
    assert {r.pubid: predictions[r.pubid] for r in test_records} == {r.pubid: r.final_decision for r in test_records}


@pytest.mark.e2e
def test_two_ranks_match_one_process(trained, test_split_run, tmp_path):
    # A different batch size too: padding must not change any answer.
    check_ok(evaluate(trained[0], tmp_path, "--eval_batch_size", "5", launcher="torchrun", nproc=2))
    one, two = test_split_run[0], tmp_path
    assert read_json(two / "predictions.json") == read_json(one / "predictions.json")
    m1, m2 = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    assert m2["confusion_matrix"] == m1["confusion_matrix"] and m2["accuracy"] == m1["accuracy"]
    assert m2["macro_f1"] == m1["macro_f1"] and m2["majority_baseline"] == m1["majority_baseline"]


@pytest.mark.e2e
def test_generative_mode_answers_trained_dev_questions(trained, tmp_path):
    folder, _, dev_records = trained
    check_ok(evaluate(folder, tmp_path, "--split", "dev", "--mode", "generate"))
    predictions, metrics = read_json(tmp_path / "predictions.json"), read_json(tmp_path / "metrics.json")
    assert len(predictions) == metrics["num_questions"] == 50 and metrics["mode"] == "generate"
    assert {r.pubid: predictions[r.pubid] for r in dev_records} == {r.pubid: r.final_decision for r in dev_records}
    assert metrics["unparsed"] == sum(p is None for p in predictions.values())


@pytest.mark.e2e  # its model is trained first (~10 s alone, a minute beside other runs)
def test_answer_question_api(trained):
    folder, test_records, _ = trained
    model = load_saved_model(str(folder), torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for record in test_records:
        answer = answer_question(model, tokenizer, record.question, record.contexts, max_length=SEQ_LEN)
        assert answer.decision == record.final_decision and answer.text.strip() == record.final_decision
        assert math.isclose(sum(answer.probabilities.values()), 1.0, abs_tol=1e-6)
    assert answer_question(model, tokenizer, "Is it?", [], max_length=20).probabilities is None


@pytest.mark.e2e
def test_generate_launcher_prints_text_and_probabilities(trained):
    folder, test_records, _ = trained
    record = test_records[1]
    proc = launch(["--model", str(folder), record.question, *[a for c in record.contexts for a in ("--context", c)],
                   "--max_length", "320"], script=GENERATE_PY)
    check_ok(proc)
    match = re.search(r"decision: (\w+) +\(yes ([\d.]+) +no ([\d.]+) +maybe ([\d.]+)\)", proc.stdout)
    assert match and match.group(1) == record.final_decision, proc.stdout
    assert math.isclose(sum(float(match.group(i)) for i in (2, 3, 4)), 1.0, abs_tol=2e-3)
    assert proc.stdout.splitlines()[0].strip() == record.final_decision


# --- Bad input: exit code 2, one "medgpt: error:" line, no traceback.

def predictions_file(tmp, drop=0, add=()):
    gold = read_json(GROUND_TRUTH)
    predictions = dict.fromkeys(list(gold)[drop:], "yes") | dict.fromkeys(add, "no")
    path = tmp / "predictions.json"
    path.write_text(json.dumps(predictions))
    return path


def not_a_causal_lm(tmp):
    (tmp / "vit").mkdir()
    (tmp / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return tmp / "vit"


def deeper_config(tmp, model):
    """The model's folder with n_layer 2 -> 3 in its config.json: once exit 0, a random third layer answering."""
    copy = tmp / "deeper"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    return copy


BAD_INPUT = {
    "missing model folder": (EVALUATE_PY, lambda tmp, model: ["--model", str(tmp / "absent")],
                             "model folder .* does not exist"),
    "not a causal LM": (EVALUATE_PY, lambda tmp, model: ["--model", str(not_a_causal_lm(tmp))],
                        "cannot load .* as a causal language model"),
    "unknown split": (EVALUATE_PY, lambda tmp, model: ["--model", str(model), "--split", "train"],
                      "split 'train' is unknown"),
    "fold outside 0..9": (EVALUATE_PY, lambda tmp, model: ["--model", str(model), "--fold", "10"],
                          r"fold must be 0\.\.9"),
    "predictions missing PMIDs": (EVALUATE_PY, lambda tmp, model: ["--predictions", str(predictions_file(tmp, drop=2))],
                                  "exactly the 500 PMIDs .*: 2 missing"),
    "predictions with extra PMIDs": (EVALUATE_PY, lambda tmp, model: ["--predictions",
                                                                      str(predictions_file(tmp, add=["1"]))],
                                     "0 missing .*, 1 extra"),
    "config that disagrees with the weights": (
        GENERATE_PY, lambda tmp, model: ["--model", str(deeper_config(tmp, model)), "Is it?"],
        "its config.json does not match its weights"),
    "empty question": (GENERATE_PY, lambda tmp, model: ["--model", str(model), "  "], "the question is empty"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error(trained, tmp_path, case):
    script, make_args, message = BAD_INPUT[case]
    args = make_args(tmp_path, trained[0])
    if script == EVALUATE_PY:
        args += ["--data", str(ORI_JSON), "--output_dir", str(tmp_path / "out")]
    proc = launch(args, script=script)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("medgpt: error:")]) == 1
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_rescoring_predictions_matches_the_run(test_split_run):
    out, _ = test_split_run
    proc = launch(["--predictions", str(out / "predictions.json"), "--data", str(ORI_JSON),
                   "--output_dir", str(out / "rescored")], script=EVALUATE_PY)
    check_ok(proc)
    rescored, original = read_json(out / "rescored" / "metrics.json"), read_json(out / "metrics.json")
    assert rescored == {k: v for k, v in original.items() if k in rescored}


# --- Training logs answer metrics on dev, scores the test set at the end and exports a model card.

EXPORT_PY = str(REPO / "launcher" / "export.py")
# medgpt's console lines: its own messages, the step and test scores, its progress lines (no terminal here).
MEDGPT_LINE = re.compile(r"(medgpt: |step \d+: |test: |train: step \d+/\d+ \| )")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    """A 4-step run that saves step 2 and the final step 4: (output_dir, its process)."""
    out = tmp_path_factory.mktemp("trained-run") / "run"
    # Micro-batch 8: the scoring batch too (the 500 test questions in 63 forwards).
    proc = launch(tiny_args(out, data_cache, max_steps=4, eval_every=2, micro_batch_size=8, grad_accum=1,
                            save_every=2, keep_last=0))
    check_ok(proc)
    return out, proc


def majority_share(records):
    """Accuracy of always giving the commonest answer, counted here from the records."""
    counts = Counter(r.final_decision for r in records)
    return max(counts.values()) / len(records)


@pytest.mark.e2e
def test_training_logs_accuracy_and_writes_test_metrics(trained_run):
    out, proc = trained_run
    scalars = read_scalars(out)
    for tag in ("eval/accuracy", "eval/macro_f1", "eval/majority_accuracy", "eval/majority_macro_f1"):
        assert [step for step, _ in scalars[tag]] == [2, 4] and all(0 <= v <= 1 for _, v in scalars[tag]), tag
    assert [step for step, _ in scalars["test/accuracy"]] == [4] and "test/macro_f1" in scalars
    metrics, predictions = read_json(out / "test_metrics.json"), read_json(out / "test_predictions.json")
    assert predictions.keys() == read_json(GROUND_TRUTH).keys() and metrics["num_questions"] == 500
    assert scalars["test/accuracy"][0][1] == pytest.approx(metrics["accuracy"])
    records = load_records(str(ORI_JSON))
    split = official_split(records, fold=0)
    dev_majority = majority_share([records[i] for i in split.dev])
    assert [v for _, v in scalars["eval/majority_accuracy"]] == pytest.approx([dev_majority] * 2)
    test_majority = majority_share([records[i] for i in split.test])
    assert scalars["test/majority_accuracy"][0][1] == pytest.approx(test_majority)
    # Every score printed stands next to its baseline; nothing but medgpt's lines (DeepSpeed, transformers
    # and datasets report errors only).
    assert re.search(rf"test: accuracy [\d.]+, macro-F1 [\d.]+ \| majority baseline \(always 'yes'\): "
                     rf"accuracy {test_majority:.3f}", proc.stdout), proc.stdout
    assert len(re.findall(r"step \d: eval loss .* majority baseline", proc.stdout)) == 2
    lines = [part.strip() for line in (proc.stdout + proc.stderr).splitlines() for part in line.split("\r")]
    assert [line for line in lines if line and not MEDGPT_LINE.match(line)] == []


def card_of(folder):
    """A model card's YAML metadata and its text."""
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.e2e
def test_the_export_explains_itself(trained_run):
    out, _ = trained_run
    metadata, body = card_of(out / "export")
    test = read_json(out / "test_metrics.json")
    assert metadata["datasets"] == ["qiaojin/PubMedQA"] and metadata["language"] == "en" and "license" in metadata
    assert "base_model" not in metadata  # a random init from a GPT2Config .json
    scores = {m["name"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"Accuracy": test["accuracy"], "Macro-F1": test["macro_f1"],
                      "Majority baseline accuracy (always 'yes')": test["majority_baseline"]["accuracy"],
                      "Majority baseline macro-F1 (always 'yes')": test["majority_baseline"]["macro_f1"]}
    assert context_text(["<contexts, joined by spaces>"]) + question_text("<question>") in body
    assert f"majority baseline (always 'yes'): accuracy {test['majority_baseline']['accuracy']:.3f}" in body
    assert "fold 0" in body and "| seq_len | 384 |" in body and "4 optimizer steps" in body
    card_config = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert card_config == {section: fields for section, fields in saved.items() if section not in RECORD_KEYS}
    assert read_json(out / "export" / "config.json")["medgpt"] == {
        "seq_len": 384, "prompt_format": PROMPT_FORMAT_VERSION, "fold": 0, "long_answer": False, "step": 4}


@pytest.mark.e2e
def test_every_record_says_where_the_numbers_come_from(trained_run):
    """Versions, medgpt's commit, hosts and devices: in medgpt.json, config.yaml, TensorBoard and the card."""
    out, _ = trained_run
    provenance = read_json(out / "checkpoints" / "step4" / "medgpt.json")["provenance"]
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["versions"]["deepspeed"]
    assert provenance["source"] == checkout_commit()
    assert provenance["hosts"] == [socket.gethostname()] and sum(provenance["devices"].values()) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["provenance"] == provenance
    assert f"torch: {torch.__version__}" in tensorboard_text(out, "provenance")
    card = (out / "export" / "README.md").read_text()
    assert "## Provenance\n\nTrained (its last part) with python " in card and f"torch {torch.__version__}" in card
    source = provenance["source"]
    assert (f"medgpt commit {source['commit'][:12]}" if source else "medgpt outside a git checkout") in card
    assert "PubMedQA pqa_labeled, official split, fold 0: 450 training / 50 dev questions" in card


@pytest.mark.e2e
def test_an_unscored_checkpoint_exports_a_card_without_scores(trained_run, tmp_path):
    out, _ = trained_run
    proc = launch(["--checkpoint", str(out / "checkpoints" / "step2"), "--output_dir", str(tmp_path / "hf")],
                  script=EXPORT_PY)
    check_ok(proc)
    assert proc.stdout.strip() == f"exported {tmp_path / 'hf'}" and proc.stderr == ""
    metadata, body = card_of(tmp_path / "hf")
    assert "model-index" not in metadata and "Not scored" in body and "2 optimizer steps" in body
    assert read_json(tmp_path / "hf" / "config.json")["medgpt"]["step"] == 2


@pytest.mark.e2e
def test_evaluate_takes_seq_len_from_the_export(trained_run, trained, tmp_path):
    out, _ = trained_run
    base = ["--model", str(out / "export"), "--data", str(ORI_JSON), "--split", "dev", "--eval_batch_size", "25"]
    check_ok(launch([*base, "--output_dir", str(tmp_path / "default")], script=EVALUATE_PY))
    check_ok(launch([*base, "--seq_len", "256", "--output_dir", str(tmp_path / "flag")], script=EVALUATE_PY))
    assert read_json(tmp_path / "default" / "metrics.json")["seq_len"] == 384  # the run's
    assert read_json(tmp_path / "flag" / "metrics.json")["seq_len"] == 256  # an explicit flag wins
    # A plain save_pretrained folder says nothing: evaluate.py falls back to its default.
    assert export_seq_len(str(trained[0])) is None and export_seq_len(str(out / "export")) == 384


@pytest.mark.e2e
def test_a_non_empty_output_is_only_overwritten_when_told(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("an earlier evaluation")
    args = ["--predictions", str(predictions_file(tmp_path)), "--data", str(ORI_JSON), "--output_dir", str(out)]
    proc = launch(args, script=EVALUATE_PY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("medgpt: error:")]
    assert "is not empty" in error and "--overwrite" in error
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "an earlier evaluation"
    check_ok(launch([*args, "--overwrite"], script=EVALUATE_PY))
    assert read_json(out / "metrics.json")["num_questions"] == 500
