"""No code execution from files: a checkpoint whose pickle would run code is refused (exit 2) by
export and by resume, before DeepSpeed's own loaders (weights_only=False) could open it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROGRAMS, REPO, TINY_MODEL, launch, refused, snapshot, tiny_args

EXPORT_PY = str(REPO / "launcher" / "export.py")
# The file of each ZeRO stage that export or resume hands to a DeepSpeed loader.
CRAFTED_FILE = {0: "mp_rank_00_model_states.pt", 2: "zero_pp_rank_0_mp_rank_00_optim_states.pt"}


class WritesMarker:
    """Unpickled, it calls open(marker, "w"): any code could stand in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def crafted_run(tmp: Path, stage: int) -> tuple[Path, Path]:
    """An output_dir whose latest checkpoint looks like medgpt's, with one malicious .pt file."""
    tag_dir = tmp / "run" / "checkpoints" / "step2"
    tag_dir.mkdir(parents=True)
    (tag_dir.parent / "latest").write_text("step2")
    model_config = json.loads(TINY_MODEL.read_text())
    meta = {"zero_stage": stage, "global_batch": 4, "world_size": 1, "model_config": model_config,
            "model_shape": {k: model_config.get(k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer",
                                                               "n_head", "n_inner")},
            "train_state": {"step": 2, "epoch": 0, "consumed": 8},
            "config": {"train": {"precision": "fp32"}, "data": {"packing": False, "seq_len": 384}}}
    (tag_dir / "medgpt.json").write_text(json.dumps(meta))
    marker = tmp / "code-ran"
    torch.save({"module": WritesMarker(marker)}, tag_dir / CRAFTED_FILE[stage])
    # Whoever can write the checkpoint can write its manifest too: the sizes match, the files are "complete".
    files = {p.name: p.stat().st_size for p in tag_dir.iterdir()}
    (tag_dir / "manifest.json").write_text(json.dumps({"files": files}))
    return tmp / "run", marker


@pytest.mark.e2e  # a process that imports torch: seconds
def test_the_crafted_file_runs_code_when_unpickled(tmp_path):
    """The payload is live: torch.load without weights_only runs it (so the tests below can fail)."""
    run, marker = crafted_run(tmp_path, 0)
    path = run / "checkpoints" / "step2" / CRAFTED_FILE[0]
    subprocess.run([sys.executable, str(PROGRAMS / "unpickle.py"), str(path)], check=True, capture_output=True,
                   timeout=120)
    assert marker.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("stage", sorted(CRAFTED_FILE))
def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path, stage):
    run, marker = crafted_run(tmp_path, stage)
    proc = subprocess.run([sys.executable, EXPORT_PY, "--checkpoint", str(run), "--output_dir", str(tmp_path / "hf")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    (error,) = refused(proc)
    assert CRAFTED_FILE[stage] in error and "holds more than weights" in error and "open" in error
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.e2e
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, data_cache):
    run, marker = crafted_run(tmp_path, 0)
    before = snapshot(run)
    proc = launch(tiny_args(run, data_cache, resume="auto"), timeout=300)
    (error,) = refused(proc)
    assert CRAFTED_FILE[0] in error and "holds more than weights" in error
    assert not marker.exists()
    assert snapshot(run) == before
