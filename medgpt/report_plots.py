"""The report's PNG plots. matplotlib's Figure is used without pyplot: no global figure state and no
GUI backend, a PNG is drawn by the Agg canvas (what Figure.savefig picks for .png)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from medgpt.run_results import Run

CURVES = (("train/loss", "train loss"), ("eval/loss", "dev loss"), ("eval/accuracy", "dev accuracy"))
LEGEND_RUNS = 12  # more lines than this: no legend, it would hide the curves


def plot_curves(runs: list[Run], path: Path) -> None:
    """Train loss, dev loss and dev accuracy against the step, one line per run."""
    figure = Figure(figsize=(15, 4), layout="constrained")
    for axes, (tag, title) in zip(figure.subplots(1, len(CURVES)), CURVES, strict=True):
        for run in runs:
            series = run.scalars.get(tag, [])
            axes.plot([step for step, _ in series], [value for _, value in series],
                      marker="." if len(series) < 20 else None, label=run.name)
        axes.set(title=title, xlabel="step")
        axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        axes.grid(alpha=0.3)
    if len(runs) <= LEGEND_RUNS:
        figure.legend(*axes.get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.savefig(path, dpi=100)


def plot_confusion(counts: list[list[int]], labels: list[str], path: Path) -> None:
    """The confusion matrix (rows gold, columns predicted), counts summed over a setting's runs."""
    figure = Figure(figsize=(4.5, 4), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    top = max(max(row) for row in counts)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    axes.set(xticks=range(len(labels)), xticklabels=labels, yticks=range(len(labels)), yticklabels=labels,
             xlabel="predicted", ylabel="gold", title="test, all runs")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=100)


def plot_perf(perf: list[dict[str, Any]], path: Path) -> None:
    """Throughput and peak memory of every run, one bar each."""
    figure = Figure(figsize=(max(6.0, 0.5 * len(perf) + 3), 6), layout="constrained")
    names = [p["run"] for p in perf]
    for axes, (key, title) in zip(figure.subplots(2, 1, sharex=True),
                                  (("tokens_per_s", "tokens/s (median over logged windows)"),
                                   ("peak_mem_gib", "peak memory, largest rank (GiB)")), strict=True):
        axes.bar(range(len(perf)), [p[key] or 0.0 for p in perf])
        axes.set(title=title)
        axes.grid(axis="y", alpha=0.3)
    axes.set_xticks(range(len(perf)), names, rotation=45, ha="right")
    figure.savefig(path, dpi=100)
