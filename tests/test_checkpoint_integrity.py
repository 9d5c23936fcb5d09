"""Checkpoint integrity and nothing lost at the end: every checkpoint is verified against its
manifest before use, --resume auto falls back to the newest complete one, and a rerun of a run
killed after its last step completes the test scoring and export it left undone."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import (
    REPO,
    STEPS,
    check_ok,
    ckpt_args,
    free_port,
    launch,
    launch_command,
    launch_env,
    losses,
    read_scalars,
    refused,
    remove_shm_buffers,
    run_pids,
    stopped_at,
)

pytestmark = pytest.mark.e2e

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0: the whole module state in one file


def truncate(path: Path) -> None:
    """What a process killed mid-write leaves: the first half of the file."""
    os.truncate(path, path.stat().st_size // 2)


def warnings_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("medgpt: warning:")]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, data_cache):
    reference = runs(0)
    resumed = stopped_at(reference, tmp_path / "resumed", 4, older=(2,))
    truncate(resumed / "checkpoints" / "step4" / MODEL_STATES)
    proc = launch(ckpt_args(resumed, data_cache, 0), launcher="torchrun", nproc=2)
    check_ok(proc)
    (warning,) = warnings_of(proc)  # one warning, from rank 0 only
    assert f"skipped step4: {MODEL_STATES} has " in warning and f"resuming from {resumed}/checkpoints/step2" in warning
    got, want = losses(resumed), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # steps 3-4 retrained, logged once
    assert got[2:] == want[2:]  # the same losses as the uninterrupted run, bit for bit
    # The broken step4 was replaced by a complete one when the run got there again.
    assert (resumed / "checkpoints" / "step4" / MODEL_STATES).stat().st_size == \
        (reference / "checkpoints" / "step4" / MODEL_STATES).stat().st_size


def break_missing_file(tag: Path) -> str:
    (tag / "rng" / "rank1.pt").unlink()
    return "rng/rank1.pt is missing"


def break_truncated_file(tag: Path) -> str:
    truncate(tag / MODEL_STATES)
    return f"{MODEL_STATES} has "


def break_no_manifest(tag: Path) -> str:
    (tag / "manifest.json").unlink()  # what a crash before the end of the save leaves
    return "no manifest.json"


@pytest.mark.parametrize("damage", [break_missing_file, break_truncated_file, break_no_manifest])
def test_resume_path_to_a_broken_checkpoint_is_refused(runs, tmp_path, data_cache, damage):
    tag = tmp_path / "copy" / "step4"
    shutil.copytree(runs(0) / "checkpoints" / "step4", tag)
    expected = damage(tag)
    out = tmp_path / "new"
    proc = launch(ckpt_args(out, data_cache, 0, resume=tag))
    (error,) = refused(proc)
    assert f"--resume '{tag}': checkpoint '{tag}' is incomplete or damaged" in error and expected in error
    assert not out.exists()  # refused before anything was written


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(runs, tmp_path, data_cache):
    reference = runs(0)
    resumed = stopped_at(reference, tmp_path / "resumed", 4, older=(2,))
    (resumed / "checkpoints" / "latest").unlink()
    proc = launch(ckpt_args(resumed, data_cache, 0), launcher="torchrun", nproc=2)
    check_ok(proc)
    (warning,) = warnings_of(proc)
    assert "latest is missing" in warning and f"resuming from {resumed}/checkpoints/step4" in warning
    scalars = read_scalars(resumed)
    for tag in ("train/loss", "train/lr", "test/accuracy"):  # each step once: no restart at step 0
        steps = [s for s, _ in scalars[tag]]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert scalars["train/loss"][4:] == losses(reference)[4:]
    assert (resumed / "checkpoints" / "latest").read_text() == "step8"


def run_until(cmd: list[str], marker: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start a job and read its output until marker appears (bytes as they come, not lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env())
    output, deadline = b"", time.time() + timeout
    while marker.encode() not in output and time.time() < deadline:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        output += chunk
    return proc, output.decode(errors="replace")


def test_kill_during_test_scoring_then_resume_completes_test_and_export(tmp_path, data_cache):
    out = tmp_path / "run"
    args = ckpt_args(out, data_cache, 0, max_steps=4)
    port = free_port()
    torchrun = launch_command("torchrun", nproc=2, master_port=port)
    proc, output = run_until(torchrun + args, "medgpt: scoring the 500 test questions", timeout=600)
    assert "medgpt: scoring the 500 test questions" in output, output[-3000:]
    for pid in run_pids(out):  # kill -9 of the whole job, as a scheduler's hard kill does
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    remove_shm_buffers(port)  # the killed ranks leave theirs behind
    assert not (out / "test_metrics.json").exists() and not (out / "export").exists()
    assert not (out / "checkpoints" / "step4" / "finished.json").exists()

    rerun = launch(args, launcher="torchrun", nproc=2)
    check_ok(rerun)
    assert "already finished all 4 steps; completing its test and export" in rerun.stdout
    assert json.loads((out / "test_metrics.json").read_text())["accuracy"] > 0
    assert (out / "export" / "model.safetensors").is_file()
    scalars = read_scalars(out)
    assert [s for s, _ in scalars["test/accuracy"]] == [4]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]

    again = launch(args)  # everything is there now
    check_ok(again)
    assert "already finished all 4 steps; nothing to do" in again.stdout


def test_kill_during_export_then_resume_exports(runs, tmp_path, data_cache):
    """What a kill during the export leaves, made by hand: test scoring recorded, export/ half
    written. The rerun exports from the checkpoint alone and says nothing else is to do."""
    run = tmp_path / "run"
    shutil.copytree(runs(0), run)
    (run / "export" / "model.safetensors").unlink()
    (run / "checkpoints" / "step8" / "finished.json").write_text(json.dumps(["test"]))
    test_metrics = (run / "test_metrics.json").stat().st_mtime_ns
    proc = launch(ckpt_args(run, data_cache, 0))
    check_ok(proc)
    assert "already finished all 8 steps; completing its export" in proc.stdout
    exported = load_file(run / "export" / "model.safetensors")
    original = load_file(runs(0) / "export" / "model.safetensors")
    assert exported.keys() == original.keys() and all((exported[k] == original[k]).all() for k in original)
    assert (run / "test_metrics.json").stat().st_mtime_ns == test_metrics  # not scored again
    assert "nothing to do" in launch(ckpt_args(run, data_cache, 0)).stdout


def test_export_cli_refuses_a_truncated_checkpoint(runs, tmp_path):
    tag = tmp_path / "copy" / "step8"
    shutil.copytree(runs(0) / "checkpoints" / "step8", tag)
    truncate(tag / MODEL_STATES)
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--checkpoint", str(tag),
                           "--output_dir", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    (error,) = refused(proc)
    assert "is incomplete or damaged" in error and f"{MODEL_STATES} has " in error
    assert not (tmp_path / "hf").exists()
