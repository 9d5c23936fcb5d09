"""The metrics sinks, read back with each tracker's own reader: TensorBoard (its HParams plugin and
event reader), a real MLflow local file store, W&B's offline run file."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from conftest import session_groups
from medgpt.config import Config, parse_config
from medgpt.errors import UserError
from medgpt.run_setting import flat_config, setting_id, setting_of
from medgpt.tracking import MetricsLogger

GLOBAL_BATCH = 8
SCALARS = {1: {"train/loss": 2.0, "train/epoch": 0.25}, 2: {"train/loss": 1.5, "test/accuracy": 0.625}}


def config(output_dir: Path, *flags: str) -> Config:
    return parse_config(["--output_dir", str(output_dir), *flags])


def log_run(cfg: Config, steps: dict[int, dict[str, float]] = SCALARS, purge_step: int | None = None) -> None:
    logger = MetricsLogger(cfg, GLOBAL_BATCH, purge_step=purge_step)
    for step, scalars in steps.items():
        logger.log(step, scalars)
    logger.close()


def test_report_to_names_known_trackers_whose_packages_are_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds where it is not installed
    with pytest.raises(UserError) as err:
        parse_config(["--report_to", "tensorboard, wandb,comet"])
    assert err.value.problems == [
        "report_to 'comet' is unknown; use a comma list of tensorboard, mlflow, wandb",
        "--report_to wandb needs the wandb package, which is not installed: pip install 'medgpt[wandb]'"]


def test_a_setting_leaves_out_fold_seed_and_how_a_run_was_run(tmp_path: Path) -> None:
    def setting(*flags: str, global_batch: int = GLOBAL_BATCH) -> str:
        return setting_id(setting_of(config(tmp_path / "run", *flags).to_dict(), global_batch))

    base = setting()
    assert setting("--fold", "3", "--seed", "7", "--output_dir", "elsewhere", "--save_every", "5", "--resume",
                   "none", "--grad_accum", "4", "--log_every", "3", "--report_to", "mlflow") == base
    assert setting("--lr", "1e-4") != base
    assert setting("--eval_every", "10") != base  # it decides which checkpoint is the best
    assert setting(global_batch=16) != base


def test_tensorboard_holds_the_config_and_groups_a_sweep_by_setting(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {"fold0": ("--fold", "0"), "fold1": ("--fold", "1"), "lr": ("--fold", "0", "--lr", "0.002")}
    configs = {name: config(tmp_path / name, *flags) for name, flags in runs.items()}
    for cfg in configs.values():
        log_run(cfg)
    groups = session_groups(tmp_path)
    ids = {name: setting_id(setting_of(cfg.to_dict(), GLOBAL_BATCH)) for name, cfg in configs.items()}
    assert ids["fold0"] == ids["fold1"] != ids["lr"]
    assert sorted(groups[ids["fold0"]][1]) == ["fold0/tensorboard", "fold1/tensorboard"]
    hparams, sessions = groups[ids["lr"]]
    metrics = sessions["lr/tensorboard"]
    assert (hparams["lr"], hparams["fold"], hparams["global_batch"], hparams["model"]) == (
        0.002, 0, GLOBAL_BATCH, "gpt2")
    assert "output_dir" not in hparams
    # The final test score is the session's metric value: its last scalar.
    assert metrics["test/accuracy"] == 0.625 and metrics["train/loss"] == 1.5

    events = EventAccumulator(str(tmp_path / "lr" / "tensorboard"))
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```")) == configs["lr"].to_dict()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 keeps the file store for existing users only (mlflow/store/tracking/file_store.py:225)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "medgpt-test")
    return uri


@pytest.mark.e2e  # importing MLflow takes seconds
def test_mlflow_gets_the_same_scalars_and_config(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow import MlflowClient

    cfg = config(tmp_path / "fold0-seed1", "--report_to", "tensorboard,mlflow", "--lr", "0.002")
    log_run(cfg)
    log_run(cfg, {2: {"train/loss": 1.25}}, purge_step=2)  # resumed after step 1: the same MLflow run
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("medgpt-test").experiment_id])
    assert (run.info.run_name, run.info.status) == ("fold0-seed1", "FINISHED")
    assert run.data.tags["medgpt.setting"] == setting_id(setting_of(cfg.to_dict(), GLOBAL_BATCH))
    assert run.data.params == {k: str(v) for k, v in flat_config(cfg.to_dict()).items()}
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(history) == [(1, 2.0), (2, 1.25), (2, 1.5)]  # MLflow keeps what a resumed run logs again
    assert client.get_metric_history(run.info.run_id, "test/accuracy")[0].value == 0.625
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config_yaml.read_text()) == cfg.to_dict()


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of records, each a 7-byte
    header: checksum, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.e2e  # starts W&B's service process
def test_wandb_offline_gets_the_same_scalars_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                        ("WANDB_PROJECT", "medgpt-test"), ("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config")),
                        ("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache")),
                        ("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))):
        monkeypatch.setenv(name, value)
    output_dir = tmp_path / "fold0-seed1"
    cfg = config(output_dir, "--report_to", "wandb")
    log_run(cfg)
    log_run(cfg, {2: {"train/loss": 1.25}}, purge_step=2)
    first, resumed = sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert first.name == resumed.name  # the same run id: the resumed run goes on in the same W&B run
    records = wandb_records(first)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.display_name, run.project, run.run_group) == (
        "fold0-seed1", "medgpt-test", setting_id(setting_of(cfg.to_dict(), GLOBAL_BATCH)))
    config_items = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config_items == cfg.to_dict()
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows] == [
        {**scalars, "train/global_step": step} for step, scalars in SCALARS.items()]
