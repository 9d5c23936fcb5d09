"""Scores of yes/no/maybe answers against gold: accuracy, macro-F1 (as sklearn's
``f1_score(average="macro", labels=["yes", "no", "maybe"], zero_division=0)``), per-class
precision/recall/F1, the confusion matrix and the majority-class baseline."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from medgpt.errors import UserError
from medgpt.pubmedqa import DECISIONS


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0  # zero_division=0


def per_class_scores(gold: Sequence[str], predicted: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each decision. A prediction of None (an answer that
    could not be parsed) matches no class: it only costs its gold class recall."""
    scores = {}
    for label in DECISIONS:
        hits = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        n_predicted, n_gold = sum(p == label for p in predicted), sum(g == label for g in gold)
        # F1 = 2TP / (2TP + FP + FN): 0 when the class is neither predicted nor present.
        scores[label] = {"precision": _ratio(hits, n_predicted), "recall": _ratio(hits, n_gold),
                         "f1": _ratio(2 * hits, n_predicted + n_gold), "support": n_gold}
    return scores


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Mean F1 over all three decisions, including one never predicted (its F1 is 0)."""
    return sum(s["f1"] for s in per_class_scores(gold, predicted).values()) / len(DECISIONS)


def accuracy(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    return _ratio(sum(g == p for g, p in zip(gold, predicted, strict=True)), len(gold))


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str | None]) -> list[list[int]]:
    """Rows: gold decision, columns: predicted decision, both in DECISIONS order (unparsed
    answers appear in no column)."""
    counts = Counter(zip(gold, predicted, strict=True))
    return [[counts[(g, p)] for p in DECISIONS] for g in DECISIONS]


def majority_label(gold: Sequence[str]) -> str:
    """The most frequent gold decision (ties go to the earlier one in DECISIONS)."""
    counts = Counter(gold)
    return max(DECISIONS, key=lambda d: (counts[d], -DECISIONS.index(d)))


def answer_metrics(gold: Sequence[str], predicted: Sequence[str | None]) -> dict[str, Any]:
    """Everything metrics.json holds about one set of answers."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"need as many predictions as gold labels, at least one ({len(predicted)} vs {len(gold)})")
    majority = majority_label(gold)
    always_majority = [majority] * len(gold)
    return {
        "num_questions": len(gold),
        "accuracy": accuracy(gold, predicted),
        "macro_f1": macro_f1(gold, predicted),
        "unparsed": sum(p is None for p in predicted),
        "per_class": per_class_scores(gold, predicted),
        "confusion_matrix": {"labels": list(DECISIONS), "rows": "gold", "columns": "predicted",
                             "counts": confusion_matrix(gold, predicted)},
        "majority_baseline": {"label": majority, "accuracy": accuracy(gold, always_majority),
                              "macro_f1": macro_f1(gold, always_majority)},
    }


def check_predictions(predictions: dict[str, Any], gold: dict[str, str], source: str) -> None:
    """A predictions file must answer exactly the gold PMIDs, each with a decision."""
    missing, extra = sorted(gold.keys() - predictions.keys()), sorted(predictions.keys() - gold.keys())
    if missing or extra:
        raise UserError(f"predictions '{source}' must hold exactly the {len(gold)} PMIDs of the split: "
                        f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), "
                        f"{len(extra)} extra (e.g. {', '.join(extra[:3]) or '-'})")
    wrong = sorted(pmid for pmid, answer in predictions.items() if answer not in DECISIONS)
    if wrong:
        raise UserError(f"predictions '{source}': PMID {wrong[0]} (and {len(wrong) - 1} more) has an answer "
                        f"other than {', '.join(DECISIONS)}")


def score_line(metrics: dict[str, Any]) -> str:
    """Accuracy and macro-F1 next to the majority baseline of the same questions, so that a score
    reads against always giving the commonest answer: "accuracy 0.552, macro-F1 0.237 | majority baseline
    (always 'yes'): accuracy 0.552, macro-F1 0.237". The one format of every score medgpt prints."""
    base = metrics["majority_baseline"]
    return (f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} | majority baseline (always "
            f"'{base['label']}'): accuracy {base['accuracy']:.3f}, macro-F1 {base['macro_f1']:.3f}")


def format_table(metrics: dict[str, Any], title: str) -> str:
    """A short human-readable summary of :func:`answer_metrics`."""
    lines = [title, f"{'class':<8}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
    for label, s in metrics["per_class"].items():
        lines.append(f"{label:<8}{s['precision']:>10.3f}{s['recall']:>8.3f}{s['f1']:>8.3f}{s['support']:>9}")
    lines += [score_line(metrics), f"unparsed answers: {metrics['unparsed']}"]
    return "\n".join(lines)
