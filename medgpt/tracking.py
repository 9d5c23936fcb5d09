"""Where a run's metrics go, created on rank 0 only (the caller decides): TensorBoard always (launcher/
report.py and a resumed run's purge read its events), and MLflow and W&B where --report_to names them
(optional extras). Each gets the same scalars and the resolved config.

A run's identity: its output_dir's name, its config, and its setting (medgpt.run_setting), the group
that a sweep's runs of one setting share -- a session group in TensorBoard's HParams view, a W&B
group, an MLflow tag -- so the runs of a sweep compare setting against setting.

TensorBoard's HParams view takes a session's metric values from its scalars (the last value of each
tag: hparams/backend_context.py:_compute_metric_infos_from_runs), so the hparams are written once
at the start, and the final dev/test scalars become the metrics of the run: nothing to add at the end.
Only a session start is written, no experiment summary: the plugin then builds the experiment from
every run of the sweep (backend_context.py:experiment_from_metadata), not from one run's alone.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from medgpt.config import Config, trackers
from medgpt.run_setting import REPEAT_FIELDS, flat_config, setting_id, setting_of

# The trackers' own run ids, kept so that a resumed run goes on logging into the same MLflow / W&B run.
RUN_IDS_FILE = "tracker_runs.json"
WANDB_STEP = "train/global_step"  # W&B's x axis: logged with every row, so a resumed run may go back in steps


@dataclass(frozen=True)
class RunIdentity:
    name: str  # output_dir's name: "fold3-seed1" in a sweep
    config: dict[str, dict[str, Any]]  # the resolved config, by section
    hparams: dict[str, Any]  # the setting's fields, fold and seed
    group: str  # the setting's id

    @property
    def config_yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


def run_identity(cfg: Config, global_batch: int) -> RunIdentity:
    config = cfg.to_dict()
    setting = setting_of(config, global_batch)
    repeat = {name: value for name, value in flat_config(config).items() if name in REPEAT_FIELDS}
    return RunIdentity(name=Path(cfg.train.output_dir).resolve().name, config=config,
                       hparams={**setting, **repeat}, group=setting_id(setting))


def _session_start(hparams: dict[str, Any], group: str) -> Summary:
    """The HParams plugin's session-start summary. tensorboard.plugins.hparams.summary.session_start_pb
    builds the same but imports TensorFlow; torch's add_hparams writes into a new sub-run and has no group."""
    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):  # before int: a bool is an int
            info.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            info.hparams[name].number_value = value
        elif value is not None:
            info.hparams[name].string_value = str(value)
    content = hparams_metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_start_info=info))
    return Summary(value=[Summary.Value(tag=hparams_metadata.SESSION_START_INFO_TAG, metadata=content)])


class TensorBoardSink:
    def __init__(self, output_dir: Path, identity: RunIdentity, purge_step: int | None) -> None:
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", f"```yaml\n{identity.config_yaml}```")
        self.writer.file_writer.add_summary(_session_start(identity.hparams, identity.group))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def note(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _remembered_ids(output_dir: Path) -> dict[str, str]:
    path = output_dir / RUN_IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _remember_id(output_dir: Path, tracker: str, run_id: str) -> None:
    (output_dir / RUN_IDS_FILE).write_text(json.dumps({**_remembered_ids(output_dir), tracker: run_id}, indent=1))


class MlflowSink:
    """MLflow's client on the tracking URI of MLFLOW_TRACKING_URI (else MLflow's default, ./mlflow.db),
    experiment MLFLOW_EXPERIMENT_NAME (default medgpt). The config: every field as a param (logged
    when the run is created: MLflow refuses changed values) and config.yaml as an artifact."""

    def __init__(self, output_dir: Path, identity: RunIdentity) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient()
        self.run_id = _remembered_ids(output_dir).get("mlflow")
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
            except MlflowException:  # not in this tracking store (the first attempt used another)
                self.run_id = None
        if not self.run_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "medgpt")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=identity.name,
                                                 tags={"medgpt.setting": identity.group}).info.run_id
            params = flat_config(identity.config)
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            _remember_id(output_dir, "mlflow", self.run_id)
        self.client.log_text(self.run_id, identity.config_yaml, "config.yaml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run in project WANDB_PROJECT (default medgpt), its files under output_dir/wandb; W&B's
    own variables apply (WANDB_MODE=offline, WANDB_ENTITY, ...). The same step axis as TensorBoard,
    as the Hugging Face Trainer's W&B callback does (step_metric)."""

    def __init__(self, output_dir: Path, identity: RunIdentity) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "medgpt"), name=identity.name,
                              group=identity.group, config=identity.config, dir=str(output_dir),
                              id=_remembered_ids(output_dir).get("wandb"), resume="allow")
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP, step_sync=True)
        _remember_id(output_dir, "wandb", self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, WANDB_STEP: step})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Every tracker of --report_to (TensorBoard always). ``global_batch``: rows per optimizer step,
    all ranks (part of the run's setting); ``purge_step``: TensorBoard drops the events of an earlier
    attempt from this step on (MLflow and W&B keep theirs: a resumed run logs those steps again)."""

    def __init__(self, cfg: Config, global_batch: int, purge_step: int | None = None) -> None:
        output_dir = Path(cfg.train.output_dir)
        identity = run_identity(cfg, global_batch)
        names = trackers(cfg.train.report_to)
        self.sinks: list[TensorBoardSink | MlflowSink | WandbSink] = [
            TensorBoardSink(output_dir, identity, purge_step)]
        if "mlflow" in names:
            self.sinks.append(MlflowSink(output_dir, identity))
        if "wandb" in names:
            self.sinks.append(WandbSink(output_dir, identity))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, scalars)

    def note(self, tag: str, text: str, step: int) -> None:
        """A text at a step, in TensorBoard (the config's text is there too; MLflow and W&B get the
        changed config itself)."""
        self.sinks[0].note(tag, text, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
