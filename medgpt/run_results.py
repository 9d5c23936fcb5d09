"""What launcher/report.py reads: the runs under a folder, each from its own files, so a report can
be rebuilt at any time. A run is any folder holding config.yaml (a medgpt output_dir); it has
finished once it holds test_metrics.json. Its curves come from its TensorBoard events."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medgpt.config import PROVENANCE_KEY, RECORD_KEYS
from medgpt.errors import UserError
from medgpt.run_setting import flat_config, setting_id, setting_of

Scalars = dict[str, list[tuple[int, float]]]  # tag -> (step, value), in step order


@dataclass(frozen=True)
class Run:
    name: str  # the folder, relative to the one reported on (one run reported alone: its folder's name)
    config: dict[str, dict[str, Any]]  # config.yaml
    setting: dict[str, Any]  # medgpt.run_setting.setting_of
    test: dict[str, Any] | None  # test_metrics.json; None: not finished
    scalars: Scalars
    provenance: dict[str, Any] | None = None  # config.yaml's: its last start's (None: an older run)

    @property
    def setting_id(self) -> str:
        return setting_id(self.setting)

    @property
    def fields(self) -> dict[str, Any]:
        return flat_config(self.config)

    @property
    def last_step(self) -> int | None:
        """The last step the run logged a training loss for (None: none yet)."""
        losses = self.scalars.get("train/loss")
        return losses[-1][0] if losses else None


@dataclass(frozen=True)
class Setting:
    id: str
    fields: dict[str, Any]
    runs: list[Run]  # finished ones, by name


def run_folders(folder: Path) -> list[Path]:
    """Every folder under ``folder`` (itself included) that holds config.yaml; a run's own subfolders
    (checkpoints, export, ...) are not searched."""
    found = []
    for here, subfolders, files in os.walk(folder):
        if "config.yaml" in files:
            found.append(Path(here))
            subfolders.clear()
        subfolders.sort()
    return sorted(found)


def read_scalars(tensorboard_dir: Path) -> Scalars:
    """Every scalar series, read with TensorBoard's own reader (which drops the events a resumed run
    purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return {}
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read '{path}' ({type(err).__name__}: {err}); rerun or remove that run") from None


def read_run(path: Path, folder: Path) -> Run:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read '{path / 'config.yaml'}' ({type(err).__name__}); a run's config.yaml "
                        "is the one medgpt wrote") from None
    records = {key: config.pop(key, None) for key in RECORD_KEYS} if isinstance(config, dict) else {}
    if not isinstance(config, dict) or not all(isinstance(s, dict) for s in config.values()):
        raise UserError(f"'{path / 'config.yaml'}' is not a medgpt config (sections of fields)")
    ds_config = path / "ds_config.json"
    global_batch = _read_json(ds_config).get("train_batch_size") if ds_config.exists() else None
    test = path / "test_metrics.json"
    name = str(path.relative_to(folder)) if path != folder else folder.resolve().name  # one run: its own name
    return Run(name=name, config=config, setting=setting_of(config, global_batch),
               test=_read_json(test) if test.exists() else None, scalars=read_scalars(path / "tensorboard"),
               provenance=records[PROVENANCE_KEY])


def read_runs(folder: Path) -> list[Run]:
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a folder; pass a sweep folder or a run's output_dir")
    runs = [read_run(path, folder) for path in run_folders(folder)]
    if not runs:
        raise UserError(f"no run under '{folder}': a run is a folder holding config.yaml (a medgpt output_dir)")
    return runs


def group_settings(runs: list[Run]) -> list[Setting]:
    """The finished runs by setting, settings in the order of their first run."""
    settings: dict[str, Setting] = {}
    for run in runs:
        if run.test is not None:
            settings.setdefault(run.setting_id, Setting(run.setting_id, run.setting, [])).runs.append(run)
    return list(settings.values())
