"""What launcher/report.py does: the runs under a folder (medgpt.run_results), grouped by setting,
summarised in report.md (with report.json holding the same numbers unrounded) and PNG plots
(medgpt.report_plots). Test scores come from each run's test_metrics.json, curves and throughput
from its TensorBoard events: a report can be rebuilt at any time, from a finished or a partial sweep."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from medgpt.pubmedqa import DECISIONS
from medgpt.report_plots import plot_confusion, plot_curves, plot_perf
from medgpt.run_results import Run, Setting, group_settings, read_runs

METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
# Jin et al. (2019), PubMedQA, reasoning-required setting, accuracy on the 500 test questions.
NONE = "-"  # a value a run did not log
PUBLISHED = {"majority baseline": 55.2, "single human": 78.0}


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and n."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def setting_summary(setting: Setting) -> dict[str, Any]:
    """The test scores of a setting's runs: accuracy and macro-F1, per-class scores (each spread
    over the runs) and the confusion matrix summed over the runs."""
    tests = [run.test for run in setting.runs]
    per_class = {label: {score: spread([t["per_class"][label][score] for t in tests])
                         for score in ("precision", "recall", "f1")} for label in DECISIONS}
    confusion = [[sum(t["confusion_matrix"]["counts"][i][j] for t in tests) for j in range(len(DECISIONS))]
                 for i in range(len(DECISIONS))]
    return {"id": setting.id, "runs": [run.name for run in setting.runs], "fields": setting.fields,
            "test": {name: spread([t[name] for t in tests]) for name in METRICS},
            "per_class": per_class, "confusion_matrix": confusion,
            "majority_baseline": tests[0]["majority_baseline"]}


def perf_of(run: Run) -> dict[str, Any]:
    """Throughput (median over the logged windows) and peak memory (largest rank, whole run)."""
    def median(tag: str) -> float | None:
        values = [value for _, value in run.scalars.get(tag, [])]
        return statistics.median(values) if values else None
    peaks = [value for tag, series in run.scalars.items() if tag.startswith("perf/peak_mem_gib/")
             for _, value in series]
    return {"run": run.name, "tokens_per_s": median("perf/tokens_per_s"), "mfu": median("perf/mfu"),
            "peak_mem_gib": max(peaks) if peaks else None}


def _percent(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:.1f}"


def _mean_sd(spread: dict[str, Any]) -> str:
    """"mean ± sd" in percent; the mean alone for a single run."""
    return _percent(spread["mean"]) + ("" if spread["sd"] is None else f" ± {_percent(spread['sd'])}")


def _number(value: float | None, digits: int) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def _varying(settings: list[Setting]) -> list[str]:
    """The setting fields whose values differ between settings (what tells them apart)."""
    names = dict.fromkeys(name for s in settings for name in s.fields)
    return [name for name in names if len({json.dumps(s.fields.get(name)) for s in settings}) > 1]


def _scores_table(summary: dict[str, Any]) -> list[str]:
    test, base = summary["test"], summary["majority_baseline"]
    n = test["accuracy"]["n"]
    rows = [f"| test (500 questions) | {' | '.join(f'{label} (%)' for label in METRICS.values())} |",
            "| --- | --- | --- |",
            f"| mean ± sd over {n} run(s) | " + " | ".join(
                _mean_sd(test[m]) for m in METRICS) + " |",
            "| min / max | " + " | ".join(f"{_percent(test[m]['min'])} / {_percent(test[m]['max'])}"
                                         for m in METRICS) + " |",
            f"| majority baseline ('{base['label']}' for all) | " + " | ".join(
                _percent(base[m]) for m in METRICS) + " |"]
    return rows + [f"| published {who} (Jin et al., 2019) | {value:.1f} | {NONE} |" for who, value in PUBLISHED.items()]


def _per_class_table(summary: dict[str, Any]) -> list[str]:
    rows = ["| class | precision (%) | recall (%) | F1 (%) |", "| --- | --- | --- | --- |"]
    for label, scores in summary["per_class"].items():
        rows.append(f"| {label} | " + " | ".join(_mean_sd(s) for s in scores.values()) + " |")
    return rows


def _runs_table(runs: list[Run], perf: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| run | fold | seed | accuracy (%) | macro-F1 (%) | tokens/s | MFU (%) | peak memory (GiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        p = perf[run.name]
        rows.append(f"| {run.name} | {run.fields.get('fold')} | {run.fields.get('seed')} | "
                    f"{_percent(run.test['accuracy'])} | {_percent(run.test['macro_f1'])} | "
                    f"{_number(p['tokens_per_s'], 0)} | {_percent(p['mfu'])} | {_number(p['peak_mem_gib'], 2)} |")
    return rows


def _setting_section(index: int, setting: Setting, summary: dict[str, Any], varying: list[str],
                     perf: dict[str, dict[str, Any]]) -> list[str]:
    differs = ", ".join(f"{name}={setting.fields.get(name)}" for name in varying)
    return [f"## Setting {index}: `{setting.id}`" + (f" ({differs})" if differs else ""), "",
            *_scores_table(summary), "", "Per class, mean ± sd over the runs:", "", *_per_class_table(summary), "",
            *_runs_table(setting.runs, perf), "",
            f"![curves](setting{index}-curves.png)", "",
            f"![confusion matrix](setting{index}-confusion.png)", "",
            "<details><summary>the setting's fields</summary>", "", "```yaml",
            yaml.safe_dump(setting.fields, sort_keys=False).rstrip(), "```", "", "</details>", ""]


def _unfinished_section(unfinished: list[Run]) -> list[str]:
    rows = ["## Unfinished runs", "", "No test scores yet; not counted above.", "",
            "| run | setting | last logged step |", "| --- | --- | --- |"]
    return rows + [f"| {run.name} | `{run.setting_id}` | {run.last_step if run.last_step is not None else NONE} |"
                   for run in unfinished] + [""]


def write_report(folder: Path, output_dir: Path) -> Path:
    """report.md, report.json and the PNGs into ``output_dir``; returns report.md's path."""
    runs = read_runs(folder)
    settings = group_settings(runs)
    unfinished = [run for run in runs if run.test is None]
    finished = [run for s in settings for run in s.runs]
    perf = {run.name: perf_of(run) for run in finished}
    summaries = [setting_summary(s) for s in settings]
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# medgpt report: {folder}", "",
             f"{len(finished)} finished run(s) in {len(settings)} setting(s); {len(unfinished)} unfinished. "
             "Runs of a setting differ only in fold, seed and how they were run (docs/report.md). "
             "Scores are percent; rebuild with `python launcher/report.py <folder>`.", ""]
    varying = _varying(settings)
    for index, (setting, summary) in enumerate(zip(settings, summaries, strict=True), start=1):
        lines += _setting_section(index, setting, summary, varying, perf)
        plot_curves(setting.runs, output_dir / f"setting{index}-curves.png")
        plot_confusion(summary["confusion_matrix"], list(DECISIONS), output_dir / f"setting{index}-confusion.png")
    if finished:
        lines += ["## Throughput and memory", "", "![throughput and memory](perf.png)", ""]
        plot_perf(list(perf.values()), output_dir / "perf.png")
    if unfinished:
        lines += _unfinished_section(unfinished)
    (output_dir / "report.json").write_text(json.dumps(
        {"settings": summaries, "perf": list(perf.values()),
         "provenance": {run.name: run.provenance for run in runs},
         "unfinished": [{"run": run.name, "setting": run.setting_id, "last_step": run.last_step}
                        for run in unfinished]}, indent=1))
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
