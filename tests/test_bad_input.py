"""Bad input: one clear error, exit code 2, no traceback, nothing written to output_dir."""
import json
import re

import pytest

from conftest import ORI_JSON, launch, tiny_args


def write(path, text):
    path.write_text(text)
    return path


def no_label_file(tmp):
    record = {"QUESTION": "Is it?", "CONTEXTS": ["It is."], "LONG_ANSWER": "Yes."}
    return write(tmp / "no_label.json", json.dumps({"1": {**record, "final_decision": "yes"}, "2": record}))


CASES = {
    "missing data file": (lambda tmp: {"data": tmp / "nope" / "ori_pqal.json"}, "is not a readable"),
    "malformed JSON": (lambda tmp: {"data": write(tmp / "bad.json", '{"1": {"QUESTION": ')}, "not valid JSON"),
    "record without final_decision": (lambda tmp: {"data": no_label_file(tmp)}, "record 2 has no final_decision"),
    "unknown precision": (lambda tmp: {"precision": "fp8"}, "precision 'fp8' is unknown"),
    "fp16 on CPU": (lambda tmp: {"precision": "fp16"}, "fp16 needs a GPU"),
    "inconsistent train_batch_size": (
        lambda tmp: {"ds_config": write(tmp / "ds.json", json.dumps({"train_batch_size": 6}))},
        r"train_batch_size=6 disagrees with micro_batch_size x grad_accum x world size \(2 x 2 x 1\)=4"),
    "missing ds_config": (lambda tmp: {"ds_config": tmp / "absent.json"}, "DeepSpeed config .* does not exist"),
    "negative peak_tflops": (lambda tmp: {"peak_tflops": -1}, "peak_tflops must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path, data_cache, case):
    make_overrides, message = CASES[case]
    out = tmp_path / "out"
    proc = launch(tiny_args(out, data_cache, **make_overrides(tmp_path)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medgpt: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]

    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert not out.exists()


def test_offline_hub_dataset_says_what_to_do(tmp_path, data_cache):
    out = tmp_path / "out"
    proc = launch(tiny_args(out, data_cache, data="qiaojin/PubMedQA"), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot download 'qiaojin/PubMedQA'" in proc.stderr and "ori_pqal.json" in proc.stderr
    assert not out.exists()


def test_existing_output_is_kept(tmp_path, data_cache):
    """A failed start leaves what the user already had in output_dir untouched."""
    out = tmp_path / "out"
    out.mkdir()
    keep = write(out / "notes.txt", "mine")
    proc = launch(tiny_args(out, data_cache, data=ORI_JSON.with_name("missing.json")))
    assert proc.returncode == 2 and keep.read_text() == "mine" and sorted(out.iterdir()) == [keep]
