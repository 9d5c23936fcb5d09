"""--subset pqa_artificial on a generated file in the Hub's parquet layout (bench/make_pqa_artificial.py):
the split, the packed cache that launcher/prepare_data.py builds, and the two-phase recipe."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib

import pytest
from safetensors.torch import load_file

from conftest import GROUND_TRUTH, ORI_JSON, PARQUET_DIR, REPO, TINY_MODEL, TOKENIZER, check_ok, launch
from medgpt.config import DataConfig, parse_config
from medgpt.data import tokenized_dataset, training_data
from medgpt.distributed import Dist
from medgpt.errors import UserError
from medgpt.model import load_tokenizer
from medgpt.pubmedqa import DEV_PERCENT, Record, artificial_split, load_data, load_records

ROWS = 5_000  # the test's size; bench/data_prep.py runs the full 211,269
SEQ_LEN = 384


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    """A snapshot of the Hub dataset's layout: pqa_artificial/ generated, pqa_labeled/ the shared copy."""
    root = tmp_path_factory.mktemp("pubmedqa-snapshot")
    subprocess.run([sys.executable, str(REPO / "bench" / "make_pqa_artificial.py"), "--rows", str(ROWS),
                    "--out", str(root)], check=True, capture_output=True)
    (root / "pqa_labeled").symlink_to(PARQUET_DIR, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def loaded(snapshot_dir):
    return load_data(DataConfig(data=str(snapshot_dir), subset="pqa_artificial"))


@pytest.mark.e2e
def test_dev_is_a_hashed_slice_train_the_rest_test_the_official_set(snapshot_dir, loaded):
    records, split = loaded
    assert len(records) == ROWS + 500 and split.test == list(range(ROWS, ROWS + 500))
    assert not set(split.train) & set(split.dev)
    assert sorted(split.train + split.dev) == list(range(ROWS))
    assert {records[i].pubid: records[i].final_decision for i in split.test} == json.loads(GROUND_TRUTH.read_text())
    assert 0.5 * DEV_PERCENT / 100 < len(split.dev) / ROWS < 1.5 * DEV_PERCENT / 100
    # The slice is the questions' pubids, not their positions: the same in any file order.
    artificial = records[:ROWS]
    _, reversed_split = artificial_split(artificial[::-1], records[ROWS:])
    assert {artificial[::-1][i].pubid for i in reversed_split.dev} == {records[i].pubid for i in split.dev}
    assert {records[i].pubid for i in split.dev} == {r.pubid for r in artificial
                                                     if zlib.crc32(r.pubid.encode()) % 100 < DEV_PERCENT}
    # The same rows through a single parquet file and --test_data.
    single = next((snapshot_dir / "pqa_artificial").glob("*.parquet"))
    assert load_data(DataConfig(data=str(single), subset="pqa_artificial", test_data=str(ORI_JSON))) == loaded


def test_a_test_question_in_the_artificial_file_trains_nowhere():
    test = [Record("7", "q?", ("c",), "", "no")]
    artificial = [Record(str(i), "q?", ("c",), "", "yes") for i in range(300)]
    _, split = artificial_split(artificial, test)
    assert 7 not in split.train + split.dev and len(split.train + split.dev) == 299 and split.test == [300]
    with pytest.raises(UserError, match="too few"):
        artificial_split(artificial[:5], test)


def test_subset_mistakes_are_clear_errors(snapshot_dir):
    with pytest.raises(UserError, match=r"holds pqa_labeled, not pqa_artificial; pass --data .*pqa_artificial"):
        load_records(str(snapshot_dir / "pqa_labeled"), "pqa_artificial")
    single = next((snapshot_dir / "pqa_artificial").glob("*.parquet"))
    with pytest.raises(UserError, match="holds no pqa_labeled; pass --test_data"):
        load_data(DataConfig(data=str(single), subset="pqa_artificial"))
    with pytest.raises(UserError) as err:
        parse_config(["--subset", "pqa_artificial", "--fold", "3"])
    assert err.value.problems == ["fold applies to --subset pqa_labeled only; pqa_artificial's dev slice is fixed "
                                  "by pubid (got --fold 3)"]
    with pytest.raises(UserError, match="test_data applies to --subset pqa_artificial only"):
        parse_config(["--test_data", str(ORI_JSON)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenized cache for the module: prepare_data.py builds it, the phase-1 run reuses it."""
    return tmp_path_factory.mktemp("artificial-cache")


@pytest.fixture(scope="module")
def prepared(snapshot_dir, cache):
    """launcher/prepare_data.py packs the generated pqa_artificial into a fresh cache."""
    flags = ["--data", str(snapshot_dir), "--subset", "pqa_artificial", "--tokenizer", str(TOKENIZER),
             "--cache_dir", str(cache), "--seq_len", str(SEQ_LEN), "--packing", "on"]
    proc = launch(flags, script=str(REPO / "launcher" / "prepare_data.py"), timeout=600)
    check_ok(proc)
    return proc, parse_config(flags)


@pytest.mark.e2e
def test_every_training_question_is_in_exactly_one_pack_within_seq_len(prepared, loaded):
    proc, cfg = prepared
    records, split = loaded
    data = training_data(records, split, load_tokenizer(cfg.model), cfg.data, Dist.single())
    assert data.reused and str(data.cache) in proc.stdout  # what prepare_data.py built, read back
    packs = data.train.with_format("arrow")[:]
    members = [r for rows in packs.column("rows").to_pylist() for r in rows]
    assert sorted(members) == split.train
    lengths = packs.column("sample_lengths").to_pylist()
    assert all(sum(n) <= SEQ_LEN for n in lengths)
    assert [len(ids) for ids in packs.column("input_ids").to_pylist()] == [sum(n) for n in lengths]
    tokens = tokenized_dataset(records, load_tokenizer(cfg.model), cfg.data, Dist.single())  # the cache, reused
    for pack in data.train.select(range(0, len(data.train), max(1, len(data.train) // 50))):
        assert pack["input_ids"] == [t for r in pack["rows"] for t in tokens[r]["input_ids"]]
        assert pack["sample_lengths"] == [tokens[r]["length"] for r in pack["rows"]]
    assert "padding" in proc.stdout and f"{len(split.train)} for training" in proc.stdout


@pytest.mark.e2e
def test_phase_two_starts_from_the_phase_one_export(snapshot_dir, prepared, cache, tmp_path):
    """Phase 1 on pqa_artificial (scored at the end on pqa_labeled's test set), phase 2 on
    pqa_labeled from phase 1's export folder: its weights move from there by at most lr per step
    (Adam's first step is lr x sign of the gradient), far less than a new init's distance."""
    common = ["--tokenizer", str(TOKENIZER), "--cache_dir", str(cache), "--precision", "fp32",
              "--dropout", "0", "--seq_len", str(SEQ_LEN), "--micro_batch_size", "2", "--grad_accum", "1",
              "--max_steps", "1", "--eval_every", "0", "--ds_config", str(REPO / "ds_configs" / "zero0.json")]
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    check_ok(launch([*common, "--model", str(TINY_MODEL), "--data", str(snapshot_dir), "--subset", "pqa_artificial",
                     "--lr", "1e-3", "--output_dir", str(phase1)]))
    assert json.loads((phase1 / "test_metrics.json").read_text())["num_questions"] == 500
    truth = json.loads(GROUND_TRUTH.read_text())
    assert json.loads((phase1 / "test_predictions.json").read_text()).keys() == truth.keys()
    check_ok(launch([*common, "--model", str(phase1 / "export"), "--data", str(ORI_JSON), "--lr", "1e-4",
                     "--weight_decay", "0", "--warmup_steps", "0", "--output_dir", str(phase2)]))
    start, end = (load_file(str(p / "export" / "model.safetensors")) for p in (phase1, phase2))
    moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved <= 1.01e-4
