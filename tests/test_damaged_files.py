"""Files medgpt reads are checked before they are trusted: a damaged or mismatched model folder and
damaged or mistyped data are one UserError naming the problem, never a traceback or a model with
randomly initialised parts. (The whole-process contract for these errors, exit 2 and one line:
tests/test_bad_input.py and tests/test_evaluate.py.)"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ORI_JSON, PARQUET_DIR, TINY_MODEL
from medgpt.errors import UserError
from medgpt.model import load_saved_model
from medgpt.pubmedqa import MAX_RECORD_PROBLEMS, load_records


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "saved"
    GPT2LMHeadModel(GPT2Config.from_json_file(TINY_MODEL)).save_pretrained(folder)
    return folder


def changed_copy(saved: Path, tmp: Path, config: dict | None = None, weights: bytes | None = None) -> str:
    folder = tmp / "copy"
    shutil.copytree(saved, folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def test_an_intact_folder_loads(saved_model):
    assert load_saved_model(str(saved_model), torch.device("cpu")).config.n_layer == 2


@pytest.mark.parametrize("config, message", [
    ({"n_layer": 3}, r"12 tensor\(s\) missing from the weights \(e\.g\. transformer\.h\.2\."),  # was: exit 0
    ({"n_layer": 1}, r"tensor\(s\) not in the config's model \(e\.g\. transformer\.h\.1\."),
    ({"n_embd": 128}, r"tensor\(s\) of another shape than the config's"),  # was: a traceback
])
def test_a_config_that_disagrees_with_the_weights_is_refused(saved_model, tmp_path, config, message):
    with pytest.raises(UserError, match="its config.json does not match its weights: .*" + message):
        load_saved_model(changed_copy(saved_model, tmp_path, config=config), torch.device("cpu"))


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_damaged_weights_are_refused(saved_model, tmp_path, cut):
    weights = (saved_model / "model.safetensors").read_bytes()
    damaged = weights[:len(weights) // 2] if cut == "truncated" else b"not a safetensors file" * 64
    with pytest.raises(UserError, match=r"cannot load .* \(SafetensorError: .*\); a damaged file\?"):
        load_saved_model(changed_copy(saved_model, tmp_path, weights=damaged), torch.device("cpu"))


def records_file(tmp: Path, changes: dict[int, dict]) -> str:
    """ori_pqal.json with fields of the records at the given positions replaced."""
    records = json.loads(ORI_JSON.read_text())
    for position, fields in changes.items():
        records[list(records)[position]].update(fields)
    path = tmp / "changed.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_null_and_wrongly_typed_fields_are_named_by_pubid(tmp_path):
    pubids = list(json.loads(ORI_JSON.read_text()))
    source = records_file(tmp_path, {0: {"CONTEXTS": None}, 1: {"QUESTION": 7}, 2: {"LONG_ANSWER": ["a"]}})
    with pytest.raises(UserError) as err:
        load_records(source)
    assert err.value.problems == [  # was: TypeError
        f"data source '{source}': record {pubids[0]} has contexts that are null, expected a list of texts",
        f"data source '{source}': record {pubids[1]} has a question of type int",
        f"data source '{source}': record {pubids[2]} has a long answer of type list, expected a text"]


def test_a_data_file_broken_everywhere_names_the_first_records(tmp_path):
    source = records_file(tmp_path, {i: {"CONTEXTS": "one text"} for i in range(MAX_RECORD_PROBLEMS + 3)})
    with pytest.raises(UserError) as err:
        load_records(source)
    assert len(err.value.problems) == MAX_RECORD_PROBLEMS + 1
    assert err.value.problems[-1] == f"data source '{source}': 3 more record(s) like these"


def test_a_parquet_file_cut_in_half_is_refused(tmp_path):
    (original,) = PARQUET_DIR.glob("*.parquet")
    cut = tmp_path / original.name
    cut.write_bytes(original.read_bytes()[:original.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot read its parquet file\(s\) \(ArrowInvalid: .*\); a damaged or "
                                        r"partial download\? Fetch it again"):  # was: an ArrowInvalid traceback
        load_records(str(cut))
