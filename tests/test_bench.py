"""bench/bench.py end to end on the tiny model: both frameworks really train and are measured.
No speed assertions: speed targets live in bench/RESULTS.md, not in tests."""
from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, check_ok, launch

pytestmark = pytest.mark.e2e


def test_bench_prints_both_frameworks_with_positive_numbers(tmp_path):
    # Both sides on torch's AdamW: with the JSON's plain "AdamW" the Trainer gets DeepSpeed's
    # FusedAdam, which JIT-compiles a CPU build on first use (1.5 min on 2 idle cores), a cost of
    # the environment, not of the bench's path; medgpt asks for torch's AdamW itself.
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds_config["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "zero2_torch_adam.json").write_text(json.dumps(ds_config))
    proc = launch(["--sizes", "tiny", "--steps", "2", "--reps", "1", "--device", "cpu", "--no_warmup",
                   "--micro_batch_size", "2", "--grad_accum", "1", "--seq_len", "256",
                   "--ds_config", str(tmp_path / "zero2_torch_adam.json")],
                  script=str(REPO / "bench" / "bench.py"))
    check_ok(proc)
    rows = {cells[0]: cells[1:] for line in proc.stdout.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("| ").split(" | ")]]}
    assert rows["framework"] == ["useful tokens/s", "vs HF Trainer", "padding", "tokens/step", "s/step",
                                 "peak mem GiB (max rank)", "first step s"]
    assert set(rows) == {"framework", "medgpt, packing", "medgpt, length-grouped", "HF Trainer"}
    for name in ("medgpt, packing", "medgpt, length-grouped", "HF Trainer"):
        values = [float(re.sub(r"[,x%]", "", c)) for c in rows[name]]
        tokens_per_s, ratio, padding, tokens_per_step, step_s, mem, first = values
        assert min(tokens_per_s, ratio, tokens_per_step, step_s, mem, first) > 0, rows[name]
        assert 0 <= padding < 100
    assert rows["HF Trainer"][1] == "1.00x"
    # The run's header names the work both sides did.
    assert "2 ranks x micro batch 2 x accumulation 1 = global batch 4" in proc.stdout
