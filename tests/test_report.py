"""launcher/report.py on a real 2 folds x 2 seeds sweep of tiny runs: its numbers against an
independent scoring of each run's test_predictions.json with the official ground truth, its plots
decoded, a partial sweep; and what the runs themselves logged for it (train/epoch, hparams)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    GROUND_TRUTH,
    REPO,
    check_ok,
    launch,
    launch_command,
    launch_env,
    read_scalars,
    refused,
    session_groups,
    tiny_args,
)
from medgpt.run_setting import setting_id, setting_of

REPORT_PY = str(REPO / "launcher" / "report.py")
FOLDS, SEEDS = (0, 1), (1, 2)
STEPS, GLOBAL_BATCH, TRAIN_QUESTIONS = 4, 4, 450  # micro 2 x accumulation 2 x 1 rank; a fold trains on 450
LABELS = ("yes", "no", "maybe")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """Four tiny runs side by side, each one process. A low learning rate keeps the models near
    their random (seed-dependent) init, so their answers, and scores, differ from run to run."""
    folder = tmp_path_factory.mktemp("sweep")
    procs = []
    for fold in FOLDS:
        for seed in SEEDS:
            out = folder / f"fold{fold}-seed{seed}"
            args = tiny_args(out, data_cache, max_steps=STEPS, eval_every=2, lr=1e-5, fold=fold, seed=seed)
            procs.append(subprocess.Popen(launch_command() + args, cwd=REPO, env=launch_env(), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-4000:]
    return folder


def run_names() -> list[str]:
    return [f"fold{fold}-seed{seed}" for fold in FOLDS for seed in SEEDS]


def scores(predictions: dict[str, str], gold: dict[str, str]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix, from scratch."""
    pairs = np.array([(gold[pmid], predictions[pmid]) for pmid in gold])
    confusion = np.array([[np.sum((pairs[:, 0] == g) & (pairs[:, 1] == p)) for p in LABELS] for g in LABELS])
    tp = np.diag(confusion)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(3), where=confusion.sum(0) > 0)
    recall = tp / confusion.sum(1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(3), where=precision + recall > 0)
    return {"accuracy": tp.sum() / len(pairs), "macro_f1": f1.mean(), "precision": precision, "recall": recall,
            "f1": f1, "confusion": confusion}


def spread_text(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


@pytest.mark.e2e
def test_report_numbers_equal_an_independent_scoring_of_the_predictions(sweep: Path, tmp_path: Path) -> None:
    check_ok(launch([str(sweep), "--output_dir", str(tmp_path)], script=REPORT_PY))
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    torch_versions = {name: p["versions"]["torch"] for name, p in report["provenance"].items()}
    assert torch_versions == dict.fromkeys(report["provenance"], torch.__version__) and len(torch_versions) >= 2
    gold = json.loads(GROUND_TRUTH.read_text())
    runs = {name: scores(json.loads((sweep / name / "test_predictions.json").read_text()), gold)
            for name in run_names()}
    (setting,) = report["settings"]
    assert sorted(setting["runs"]) == run_names()
    for metric in ("accuracy", "macro_f1"):
        values = [s[metric] for s in runs.values()]
        assert len(set(values)) > 1  # the runs differ: the spread is put to the test
        expected = {"mean": np.mean(values), "sd": np.std(values, ddof=1), "min": min(values), "max": max(values)}
        assert {k: setting["test"][metric][k] for k in expected} == pytest.approx(expected, abs=1e-12)
        assert setting["test"][metric]["n"] == 4
        assert spread_text(values) in markdown
    for i, label in enumerate(LABELS):
        for score in ("precision", "recall", "f1"):
            values = [s[score][i] for s in runs.values()]
            assert setting["per_class"][label][score]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert setting["per_class"][label][score]["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert setting["confusion_matrix"] == sum(s["confusion"] for s in runs.values()).tolist()
    always_yes = np.mean([answer == "yes" for answer in gold.values()])
    assert setting["majority_baseline"]["accuracy"] == pytest.approx(always_yes) == pytest.approx(0.552)
    assert "| published majority baseline (Jin et al., 2019) | 55.2 |" in markdown
    assert "| published single human (Jin et al., 2019) | 78.0 |" in markdown
    for perf in report["perf"]:  # throughput and memory: the runs' own perf/ scalars
        scalars = read_scalars(sweep / perf["run"])
        assert perf["tokens_per_s"] == pytest.approx(np.median([v for _, v in scalars["perf/tokens_per_s"]]))
        assert perf["peak_mem_gib"] == pytest.approx(max(v for _, v in scalars["perf/peak_mem_gib/rank0"]))
    assert_plots(tmp_path, markdown, expected=3)


def assert_plots(folder: Path, markdown: str, expected: int) -> None:
    """Every plot report.md shows is a PNG that decodes to a picture of more than one colour."""
    import matplotlib.image

    plots = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", markdown)
    assert len(plots) == expected and sorted(plots) == sorted(p.name for p in folder.glob("*.png"))
    for name in plots:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(folder / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20, f"{name} is (nearly) blank"


@pytest.mark.e2e
def test_a_partial_sweep_reports_what_has_finished(sweep: Path, tmp_path: Path) -> None:
    """A run stopped before its test scoring (config, ds_config and events only) is listed, not counted."""
    partial = tmp_path / "sweep"
    shutil.copytree(sweep, partial, ignore=shutil.ignore_patterns("checkpoints", "export"))
    for name in ("test_metrics.json", "test_predictions.json"):
        (partial / "fold1-seed2" / name).unlink()
    check_ok(launch([str(partial)], script=REPORT_PY))
    report = json.loads((partial / "report" / "report.json").read_text())
    assert sorted(report["settings"][0]["runs"]) == run_names()[:3]
    assert report["settings"][0]["test"]["accuracy"]["n"] == 3
    assert [(u["run"], u["last_step"]) for u in report["unfinished"]] == [("fold1-seed2", STEPS)]
    assert "| fold1-seed2 |" in (partial / "report" / "report.md").read_text().split("## Unfinished runs")[1]


@pytest.mark.e2e
def test_report_refuses_a_folder_without_runs(tmp_path: Path) -> None:
    lines = refused(launch([str(tmp_path)], script=REPORT_PY))
    assert lines == [f"no run under '{tmp_path}': a run is a folder holding config.yaml (a medgpt output_dir)"]
    assert not (tmp_path / "report").exists()


@pytest.mark.e2e
def test_runs_log_their_epoch_and_identity_for_tensorboard(sweep: Path) -> None:
    for name in run_names():
        epochs = read_scalars(sweep / name)["train/epoch"]
        steps_per_epoch = TRAIN_QUESTIONS // GLOBAL_BATCH
        assert epochs == [(step, pytest.approx(step / steps_per_epoch)) for step in range(1, STEPS + 1)]
    config = yaml.safe_load((sweep / "fold0-seed1" / "config.yaml").read_text())
    ((group, (hparams, sessions)),) = session_groups(sweep).items()  # one setting in the HParams view
    assert group == setting_id(setting_of(config, GLOBAL_BATCH))
    assert hparams["lr"] == 1e-5
    assert sorted(sessions) == [f"{name}/tensorboard" for name in run_names()]
    for session, metrics in sessions.items():
        test = json.loads((sweep / session.removesuffix("/tensorboard") / "test_metrics.json").read_text())
        assert metrics["test/accuracy"] == pytest.approx(test["accuracy"])
        assert metrics["test/macro_f1"] == pytest.approx(test["macro_f1"])
