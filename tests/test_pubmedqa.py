import json
from collections import Counter

import pytest

from conftest import GROUND_TRUTH, ORI_JSON, PARQUET_DIR
from medgpt.errors import UserError
from medgpt.pubmedqa import load_records, official_split


@pytest.fixture(scope="module")
def records():
    return load_records(str(ORI_JSON))


def test_test_split_equals_official_ground_truth(records):
    truth = json.loads(GROUND_TRUTH.read_text())
    test = official_split(records, fold=0).test
    assert len(test) == 500
    assert {records[i].pubid: records[i].final_decision for i in test} == truth


def test_cv_folds_are_450_50_disjoint_and_stratified(records):
    test = set(official_split(records, 0).test)
    devs = []
    for fold in range(10):
        split = official_split(records, fold)
        assert len(split.train) == 450 and len(split.dev) == 50
        assert not set(split.train) & set(split.dev)
        assert set(split.train) | set(split.dev) | test == set(range(1000))
        assert set(split.test) == test
        devs.append(set(split.dev))
        labels = Counter(records[i].final_decision for i in split.dev)
        # 276 yes / 169 no / 55 maybe cut per label into chunks of 28 / 17 / 6; folds 0-8 then give
        # one random question to the short last fold (24 / 16 / 1 before it receives those nine).
        if fold < 9:
            assert 27 <= labels["yes"] <= 28 and 16 <= labels["no"] <= 17 and 5 <= labels["maybe"] <= 6, labels
        else:
            assert labels["yes"] >= 24 and labels["no"] >= 16 and labels["maybe"] >= 1, labels
    assert set().union(*devs) == set(range(1000)) - test
    assert sum(len(d) for d in devs) == 500


def test_parquet_file_folder_and_json_give_the_same_records(records):
    assert load_records(str(PARQUET_DIR)) == records
    assert load_records(str(next(PARQUET_DIR.glob("*.parquet")))) == records
    assert Counter(r.final_decision for r in records) == {"yes": 552, "no": 338, "maybe": 110}


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not a readable"):
        load_records(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_records(str(bad))
    no_label = tmp_path / "no_label.json"
    no_label.write_text(json.dumps({"1": {"QUESTION": "q?", "CONTEXTS": ["c"]}}))
    with pytest.raises(UserError, match="record 1 has no final_decision"):
        load_records(str(no_label))
    with pytest.raises(UserError, match="fold must be"):
        official_split(load_records(str(ORI_JSON)), 10)
