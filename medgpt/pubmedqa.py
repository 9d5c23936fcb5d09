"""PubMedQA: load pqa_labeled or pqa_artificial from any of their homes (the Hub, its parquet
layout, the original JSON) as one record type, and split them: pqa_labeled exactly as the
official ``preprocess/split_dataset.py`` does, pqa_artificial into train and a hashed dev slice."""
from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgpt.errors import UserError, check_all

if TYPE_CHECKING:
    import pyarrow as pa

    from medgpt.config import DataConfig

HUB_DATASET = "qiaojin/PubMedQA"
# The Hub dataset's configurations medgpt trains on: 1,000 expert-labelled questions, or 211,269
# machine-labelled ones (PubMedQA's first fine-tuning phase).
SUBSETS = ("pqa_labeled", "pqa_artificial")
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


MAX_RECORD_PROBLEMS = 5  # a broken conversion breaks every record: the first few say what is wrong


def _field_problem(question: Any, contexts: Any, long_answer: Any, decision: Any) -> str | None:
    """What makes one record unusable, if anything (a null or wrongly typed field)."""
    if decision is None:
        return "has no final_decision"
    if decision not in DECISIONS:
        return f"has final_decision '{decision}', expected one of {', '.join(DECISIONS)}"
    if not isinstance(question, str) or not question.strip():
        return "has an empty question" if isinstance(question, str) else f"has a question {_kind(question)}"
    if not isinstance(contexts, list | tuple) or not all(isinstance(c, str) for c in contexts):
        kind = "that are null" if contexts is None else _kind(contexts)
        return f"has contexts {kind}, expected a list of texts"
    if long_answer is not None and not isinstance(long_answer, str):
        return f"has a long answer {_kind(long_answer)}, expected a text"
    return None


def _kind(value: Any) -> str:
    return "that is null" if value is None else f"of type {type(value).__name__}"


def _records(rows: Iterable[tuple[Any, Any, Any, Any, Any]], source: str) -> list[Record]:
    """Records from (pubid, question, contexts, long_answer, final_decision) rows, every row
    checked; the first few unusable ones named, by pubid, in one UserError."""
    records, problems = [], []
    for pubid, question, contexts, long_answer, decision in rows:
        problem = _field_problem(question, contexts, long_answer, decision)
        if problem:
            problems.append(f"data source '{source}': record {pubid} {problem}")
        else:
            records.append(Record(str(pubid), question, tuple(contexts), long_answer or "", decision))
    if len(problems) > MAX_RECORD_PROBLEMS:
        problems[MAX_RECORD_PROBLEMS:] = [f"data source '{source}': {len(problems) - MAX_RECORD_PROBLEMS} more "
                                          "record(s) like these"]
    if problems:
        raise UserError(*problems)
    if not records:
        raise UserError(f"data source '{source}' holds no PubMedQA records")
    return records


def _from_original_json(path: Path) -> list[Record]:
    """ori_pqal.json: {pmid: {QUESTION, CONTEXTS, LONG_ANSWER, final_decision, ...}}."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"data file '{path}' is not valid JSON ({err}); pass the original "
                        "ori_pqal.json, a parquet file, or the Hub id") from None
    if not isinstance(raw, dict):
        raise UserError(f"data file '{path}' must be a JSON object keyed by PMID, as ori_pqal.json is")
    for pmid, item in raw.items():
        missing = [k for k in ("QUESTION", "CONTEXTS", "final_decision") if not isinstance(item, dict) or k not in item]
        if missing:
            raise UserError(f"data file '{path}': record {pmid} has no {', '.join(missing)}; "
                            "every record needs QUESTION, CONTEXTS and final_decision")
    return _records(((pmid, item["QUESTION"], item["CONTEXTS"], item.get("LONG_ANSWER"), item["final_decision"])
                     for pmid, item in raw.items()), str(path))


def _from_hf_table(table: pa.Table, source: str) -> list[Record]:
    """Rows in the Hub's layout (pubid, question, context.contexts, ...), read column by column:
    a row-by-row walk of 211k rows takes a minute, this takes seconds."""
    required = {"pubid", "question", "context", "final_decision"}
    missing = required - set(table.column_names)
    if missing:
        raise UserError(f"data source '{source}' has no column(s) {', '.join(sorted(missing))}; "
                        "expected the Hub's PubMedQA layout")
    import pyarrow.compute as pc

    columns = {name: table.column(name).to_pylist() for name in ("pubid", "question", "final_decision")}
    contexts = pc.struct_field(table.column("context"), "contexts").to_pylist()
    long_answers = (table.column("long_answer").to_pylist() if "long_answer" in table.column_names
                    else [None] * len(table))
    return _records(zip(columns["pubid"], columns["question"], contexts, long_answers, columns["final_decision"],
                        strict=True), source)


def _parquet_files(path: Path, subset: str) -> list[Path]:
    """A file, a folder of parquet files, or a snapshot of the Hub dataset (one folder per subset)."""
    if path.is_file():
        return [path]
    if path.name in SUBSETS and path.name != subset:
        raise UserError(f"data folder '{path}' holds {path.name}, not {subset}; pass --data "
                        f"{path.parent / subset} or --subset {path.name}")
    folder = path / subset if (path / subset).is_dir() else path
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise UserError(f"data folder '{path}' holds no .parquet file")
    return files


def _is_hub_id(source: str) -> bool:
    """Anything that does not look like a local file or folder."""
    path = Path(source)
    return not (path.exists() or path.suffix in (".json", ".parquet") or source.startswith((".", "/", "~")))


def _from_hub(source: str, subset: str) -> pa.Table:
    import datasets

    try:
        return datasets.load_dataset(source, subset, split="train").data.table
    except (ConnectionError, OSError) as err:
        raise UserError(
            f"cannot download '{source}' (config {subset}) from the Hugging Face Hub ({err}). "
            "Offline? Pass --data with a local copy: the original ori_pqal.json or the Hub's "
            "parquet file/folder (e.g. ../shared/data/pubmedqa/ori_pqal.json)") from None


def load_records(source: str, subset: str = "pqa_labeled") -> list[Record]:
    """Load a subset from the Hub id, a parquet file or folder, or the original JSON
    (ori_pqal.json, or ori_pqaa.json: the file holds one subset, whichever it is)."""
    # Imported here: pyarrow and datasets take a second to import, which the launchers' --help
    # (this module's DECISIONS and NUM_FOLDS) does without.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source)
    if path.is_dir() or (path.suffix == ".parquet" and path.is_file()):
        files = _parquet_files(path, subset)
        try:
            table = pq.read_table(files)
        except (pa.ArrowException, OSError) as err:  # a file cut short, or not parquet at all
            raise UserError(f"data source '{source}': cannot read its parquet file(s) ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); a damaged or partial download? Fetch it again") from None
        return _from_hf_table(table, source)
    if path.suffix == ".json" and path.is_file():
        return _from_original_json(path)
    if not _is_hub_id(source):
        raise UserError(f"data source '{source}' is not a readable ori_pqal.json, .parquet file or "
                        f"parquet folder; pass --data with one of those, or the Hub id {HUB_DATASET}")
    return _from_hf_table(_from_hub(source, subset), source)

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


# pqa_artificial has no official split. Its dev slice: the questions whose pubid hashes into the
# first DEV_PERCENT of 100 buckets. A hash of the pubid, not a seeded draw: the same questions are
# held out by every run, seed and world size, and in any file order or a file with rows added.
DEV_PERCENT = 1


def in_artificial_dev(pubid: str) -> bool:
    return zlib.crc32(pubid.encode()) % 100 < DEV_PERCENT


def artificial_split(artificial: list[Record], test: list[Record]) -> tuple[list[Record], Split]:
    """pqa_artificial followed by pqa_labeled's official test questions, and their split: the
    hashed dev slice, all other questions train, test = the appended ones. A question whose pubid
    is also a test question's trains nowhere (the published subsets share none; a file that
    does would leak the test set into training)."""
    test_pubids = {r.pubid for r in test}
    train: list[int] = []
    dev: list[int] = []
    for i, r in enumerate(artificial):
        if r.pubid not in test_pubids:
            (dev if in_artificial_dev(r.pubid) else train).append(i)
    if not train or not dev:
        raise UserError(f"the pqa_artificial data holds {len(artificial)} questions, too few for its "
                        f"{DEV_PERCENT}% dev slice and a training set; pass the full pqa_artificial")
    records = artificial + test
    return records, Split(train=train, dev=dev, test=list(range(len(artificial), len(records))))


def labeled_test_source(cfg: DataConfig) -> str:
    """Where pqa_labeled (for its official test set) comes from with --subset pqa_artificial."""
    path = Path(cfg.data)
    if cfg.test_data:
        return cfg.test_data
    if path.is_dir() and (path / "pqa_labeled").is_dir():
        return str(path / "pqa_labeled")
    if _is_hub_id(cfg.data):
        return cfg.data  # a Hub id: its pqa_labeled configuration
    raise UserError(f"--subset pqa_artificial is scored at the end on pqa_labeled's official test set, and "
                    f"'{cfg.data}' holds no pqa_labeled; pass --test_data with it (ori_pqal.json, its parquet, "
                    f"or the Hub id {HUB_DATASET})")


def load_data(cfg: DataConfig) -> tuple[list[Record], Split]:
    """The records of --subset and their split (positions into them): pqa_labeled's official
    one (fold ``cfg.fold``), or for pqa_artificial its own train/dev plus pqa_labeled's test set."""
    if cfg.subset == "pqa_labeled":
        records = load_records(cfg.data, "pqa_labeled")
        return records, official_split(records, cfg.fold)
    labeled, artificial = check_all(lambda: load_records(labeled_test_source(cfg), "pqa_labeled"),
                                    lambda: load_records(cfg.data, "pqa_artificial"))
    return artificial_split(artificial, [labeled[i] for i in official_split(labeled, 0).test])
