"""PubMedQA pqa_labeled: load it from any of its three homes as one record type, and split it
exactly as the official ``preprocess/split_dataset.py`` does."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medgpt.errors import UserError

if TYPE_CHECKING:
    import datasets

HUB_DATASET = "qiaojin/PubMedQA"
DECISIONS = ("yes", "no", "maybe")
NUM_FOLDS = 10  # the official cross-validation folds of the training half


def fold_problem(fold: int) -> str | None:
    """What is wrong with a --fold value (None: it names one of the official folds)."""
    if 0 <= fold < NUM_FOLDS:
        return None
    return f"fold must be 0..{NUM_FOLDS - 1}, one of the {NUM_FOLDS} official folds (got {fold})"


@dataclass(frozen=True)
class Record:
    pubid: str
    question: str
    contexts: tuple[str, ...]
    long_answer: str
    final_decision: str  # yes | no | maybe


def _check(records: list[Record], source: str) -> list[Record]:
    if not records:
        raise UserError(f"data source '{source}' holds no PubMedQA records")
    for r in records:
        if r.final_decision not in DECISIONS:
            raise UserError(f"data source '{source}': record {r.pubid} has final_decision "
                            f"'{r.final_decision}', expected one of {', '.join(DECISIONS)}")
        if not r.question.strip():
            raise UserError(f"data source '{source}': record {r.pubid} has an empty question")
    return records


def _from_original_json(path: Path) -> list[Record]:
    """ori_pqal.json: {pmid: {QUESTION, CONTEXTS, LONG_ANSWER, final_decision, ...}}."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"data file '{path}' is not valid JSON ({err}); pass the original "
                        "ori_pqal.json, a parquet file, or the Hub id") from None
    if not isinstance(raw, dict):
        raise UserError(f"data file '{path}' must be a JSON object keyed by PMID, as ori_pqal.json is")
    records = []
    for pmid, item in raw.items():
        missing = [k for k in ("QUESTION", "CONTEXTS", "final_decision") if not isinstance(item, dict) or k not in item]
        if missing:
            raise UserError(f"data file '{path}': record {pmid} has no {', '.join(missing)}; "
                            "every record needs QUESTION, CONTEXTS and final_decision")
        records.append(Record(str(pmid), item["QUESTION"], tuple(item["CONTEXTS"]),
                              item.get("LONG_ANSWER", ""), item["final_decision"]))
    return records


def _from_hf_rows(rows: datasets.Dataset, source: str) -> list[Record]:
    """Rows in the Hub's pqa_labeled layout (pubid, question, context.contexts, ...)."""
    required = {"pubid", "question", "context", "final_decision"}
    missing = required - set(rows.column_names)
    if missing:
        raise UserError(f"data source '{source}' has no column(s) {', '.join(sorted(missing))}; "
                        "expected the Hub's pqa_labeled layout")
    records = []
    for row in rows:
        if row["final_decision"] is None:
            raise UserError(f"data source '{source}': record {row['pubid']} has no final_decision")
        records.append(Record(str(row["pubid"]), row["question"], tuple(row["context"]["contexts"]),
                              row.get("long_answer") or "", row["final_decision"]))
    return records


def load_records(source: str) -> list[Record]:
    """Load pqa_labeled from the Hub id, a parquet file or folder, or ori_pqal.json."""
    # Imported here: datasets takes over a second to import, which the launchers' --help (this
    # module's DECISIONS and NUM_FOLDS) does without.
    import datasets

    path = Path(source)
    if path.is_dir() or (path.suffix == ".parquet" and path.is_file()):
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"data folder '{source}' holds no .parquet file")
        rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        return _check(_from_hf_rows(rows, source), source)
    if path.suffix == ".json" and path.is_file():
        return _check(_from_original_json(path), source)
    if path.exists() or path.suffix in (".json", ".parquet") or source.startswith((".", "/", "~")):
        raise UserError(f"data source '{source}' is not a readable ori_pqal.json, .parquet file or "
                        f"parquet folder; pass --data with one of those, or the Hub id {HUB_DATASET}")
    try:  # anything else is a Hub dataset id
        rows = datasets.load_dataset(source, "pqa_labeled", split="train")
    except (ConnectionError, OSError) as err:
        raise UserError(
            f"cannot download '{source}' (config pqa_labeled) from the Hugging Face Hub ({err}). "
            "Offline? Pass --data with a local copy: the original ori_pqal.json or the Hub's "
            "parquet file/folder (e.g. ../shared/data/pubmedqa/ori_pqal.json)") from None
    return _check(_from_hf_rows(rows, source), source)

@dataclass(frozen=True)
class Split:
    """Positions (into the record list) of the official test set and one CV fold."""
    train: list[int]
    dev: list[int]
    test: list[int]


def _split_label(items: list[int], folds: int, rng: random.Random) -> list[list[int]]:
    rng.shuffle(items)
    size = math.ceil(len(items) / folds)
    return [items[i * size:(i + 1) * size] if i < folds - 1 else items[i * size:] for i in range(folds)]


def _stratified_split(items: list[int], labels: list[str], folds: int, rng: random.Random) -> list[list[int]]:
    """The official ``split``: shuffle each label's items, cut them into ``folds`` chunks, and
    if the last chunk came out smaller move one random item from each other chunk into it."""
    by_label: dict[str, list[int]] = {d: [] for d in DECISIONS}  # official order: yes, no, maybe
    for i in items:
        by_label[labels[i]].append(i)
    chunks = {d: _split_label(v, folds, rng) for d, v in by_label.items()}
    output = [[i for d in DECISIONS for i in chunks[d][k]] for k in range(folds)]
    _require_every_part(output, len(labels))
    if len(output[-1]) != len(output[0]):
        for k in range(folds - 1):
            picked = rng.choice(output[k])
            output[k].remove(picked)
            output[-1].append(picked)
    _require_every_part(output, len(labels))
    return output


def _require_every_part(parts: list[list[int]], questions: int) -> None:
    """A data file far smaller than pqa_labeled leaves a part of the split empty: no dev or test
    question, or (unchecked) an IndexError inside the official procedure."""
    if not all(parts):
        raise UserError(f"the data holds {questions} questions, too few for the official split: it halves them "
                        f"into test and train, then cuts train into {NUM_FOLDS} folds, each of at least one "
                        "question (pqa_labeled has 1000); pass the full pqa_labeled")


def official_split(records: list[Record], fold: int) -> Split:
    """500 test questions and fold ``fold`` of the 10 CV folds (450 train / 50 dev), reproduced
    from the official procedure: random.seed(0), records in file order."""
    if problem := fold_problem(fold):
        raise UserError(problem)
    rng = random.Random(0)
    labels = [r.final_decision for r in records]
    train_dev, test = _stratified_split(list(range(len(records))), labels, 2, rng)
    cv = _stratified_split(train_dev, labels, NUM_FOLDS, rng)
    train = [i for k, chunk in enumerate(cv) if k != fold for i in chunk]
    return Split(train=train, dev=cv[fold], test=test)
