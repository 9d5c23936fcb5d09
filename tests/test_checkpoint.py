"""Checkpoints: exact resume, resume on another world size, crash safety, export."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import (
    PROGRAMS,
    REPO,
    STEPS,
    check_ok,
    ckpt_args,
    latest_step,
    launch,
    launch_command,
    losses,
    read_scalars,
    refused,
    running,
    snapshot,
    stopped_at,
    tensorboard_text,
    tiny_args,
    wait_for_first_step,
)
from medgpt.config import build_parser, parse_config
from medgpt.errors import UserError
from medgpt.resume import plan_resume
from medgpt.startup import check_inputs

pytestmark = pytest.mark.e2e


# Step 2 is the end of warmup (tiny_args: warmup_steps 2); a resume there once drifted by one ulp
# (DeepSpeed's CPU Adam bias correction, see medgpt/adam_replay.py). With dropout on, the resumed
# run once drew other masks from its first step (its train loader took a number from the global
# RNG after the restore, see medgpt/data.py). Every stage x dropout, stage x launcher and dropout x
# launcher pair occurs once at least; ZeRO-2 resumes in test_resume_on_another_world_size.
@pytest.mark.parametrize("stage, stop, dropout, launcher", [
    (0, 2, 0.0, "torchrun"), (3, 2, 0.0, "deepspeed"), (3, 6, 0.0, "torchrun"),
    (0, 4, 0.1, "deepspeed"), (3, 4, 0.1, "torchrun")])
def test_resume_mid_epoch_is_bit_exact(runs, tmp_path, data_cache, stage, stop, dropout, launcher):
    reference = runs(stage, dropout)
    resumed = stopped_at(reference, tmp_path / "resumed", stop)
    check_ok(launch(ckpt_args(resumed, data_cache, stage, dropout=dropout), launcher=launcher, nproc=2))
    got, want = losses(resumed), losses(reference)
    if dropout:  # the masks are drawn: a loss unlike the same run's without dropout
        assert want[0] != losses(runs(stage))[0]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # one point per step, no duplicates
    assert got[stop:] == want[stop:]  # every step after the stop: the same loss bit for bit
    meta = json.loads((resumed / "checkpoints" / "step8" / "medgpt.json").read_text())
    assert meta["train_state"] == {"step": 8, "epoch": 0, "consumed": 64,  # mid-epoch: 450 questions
                                   "best_score": None, "best_step": 0, "evals_since_best": 0}


def test_a_changed_lr_on_resume_is_used_from_the_next_step_and_recorded(runs, tmp_path, data_cache):
    """Before: the checkpoint's optimizer and schedule state brought the old peak lr back, while
    config.yaml, medgpt.json and the model card said the new one."""
    reference = runs(0)
    resumed = stopped_at(reference, tmp_path / "resumed", 4)
    proc = launch(ckpt_args(resumed, data_cache, 0, lr=5e-4), launcher="torchrun", nproc=2)
    check_ok(proc)
    assert "changed since the checkpoint, used from step 5: lr 0.001 -> 0.0005" in proc.stdout, proc.stdout[-3000:]
    lr, want_lr = dict(read_scalars(resumed)["train/lr"]), dict(read_scalars(reference)["train/lr"])
    for step in range(5, STEPS + 1):  # the same warmup and cosine shape, at half the peak
        assert lr[step] == pytest.approx(want_lr[step] / 2, rel=1e-6), (step, lr, want_lr)
    got, want = dict(losses(resumed)), dict(losses(reference))
    assert got[5] == want[5]  # step 5's loss is of step 4's weights; its update is the first at the new lr
    assert all(abs(got[step] - want[step]) > 1e-5 for step in range(6, STEPS + 1)), (got, want)
    change = {"step": 5, "name": "lr", "was": 0.001, "now": 0.0005}
    meta = json.loads((resumed / "checkpoints" / "step8" / "medgpt.json").read_text())
    assert change in meta["history"] and meta["config"]["optim"]["lr"] == 0.0005
    assert change in yaml.safe_load((resumed / "config.yaml").read_text())["history"]
    assert "- step 5: lr 0.001 -> 0.0005" in (resumed / "export" / "README.md").read_text()
    assert "step 5: lr 0.001 -> 0.0005" in tensorboard_text(resumed, "resume/changed_settings")


def test_rerun_of_another_run_in_the_same_folder_is_refused(runs, data_cache, monkeypatch):
    """A finished run asked again with another fold, seed and seq_len, and in another precision:
    before, it said "nothing to do" and left the first run's test scores as if they were this one's.
    The start-up checks and the plan run here, in-process (a refused process: tests/test_bad_input.py)."""
    run = runs(0)
    before = snapshot(run)
    for variable, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(variable, value)
    cfg = parse_config(ckpt_args(run, data_cache, 0, fold=3, seed=7, seq_len=256, precision="bf16"), build_parser())
    inputs = check_inputs(cfg)
    with pytest.raises(UserError) as refusal:
        plan_resume(cfg, inputs.checkpoint, inputs.model_config, inputs.definition, world_size=1, report=False)
    errors = refusal.value.problems
    assert len(errors) == 2, errors
    assert "belongs to another run" in errors[0] and "another --output_dir" in errors[0]
    for part in ("--fold: checkpoint 0, this run 3", "--seed: checkpoint 42, this run 7",
                 "--seq_len: checkpoint 384, this run 256"):
        assert part in errors[0], errors[0]
    assert "trained in fp32, this run asks for bf16" in errors[1]
    assert snapshot(run) == before


@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(runs, tmp_path, data_cache, saved_ranks, resumed_ranks):
    """ZeRO-2 through DeepSpeed's universal checkpoint; accumulation adapts to keep the global batch."""
    if saved_ranks == 2:
        reference = runs(2)
    else:
        reference = tmp_path / "one-rank"
        check_ok(launch(ckpt_args(reference, data_cache, 2, grad_accum=4)))
    resumed = stopped_at(reference, tmp_path / "resumed")
    proc = launch(ckpt_args(resumed, data_cache, 2), launcher="torchrun", nproc=resumed_ranks)
    check_ok(proc)
    assert (resumed / "checkpoints" / "step4_universal").is_dir()
    meta = json.loads((resumed / "checkpoints" / "step8" / "medgpt.json").read_text())
    assert meta["global_batch"] == 8 and meta["world_size"] == resumed_ranks
    # The config stays as the user gave it (grad_accum 2); the run adapts its accumulation.
    assert meta["config"]["train"]["grad_accum"] == 2
    assert yaml.safe_load((resumed / "config.yaml").read_text())["train"]["grad_accum"] == 2
    ds_config = json.loads((resumed / "ds_config.json").read_text())
    assert ds_config["gradient_accumulation_steps"] == 8 // (2 * resumed_ranks)
    assert meta["train_state"]["consumed"] == 64
    for (step, value), (_, expected) in zip(losses(resumed)[4:], losses(reference)[4:], strict=True):
        assert math.isclose(value, expected, rel_tol=1e-4), (step, value, expected)


def test_keep_last(tmp_path, data_cache):
    out = tmp_path / "run"
    check_ok(launch(tiny_args(out, data_cache, max_steps=6, save_every=1, keep_last=2, eval_every=0)))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step5", "step6"]
    assert (root / "latest").read_text() == "step6"


def test_finished_run_is_not_restarted(runs, data_cache):
    run = runs(0)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = launch(ckpt_args(run, data_cache, 0))
    check_ok(proc)
    assert "already finished" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_sigkill_during_save_keeps_latest_complete(tmp_path, data_cache):
    out = tmp_path / "run"
    args = tiny_args(out, data_cache, max_steps=6, save_every=2, keep_last=0, eval_every=0,
                     ds_config=REPO / "ds_configs" / "zero2.json")
    proc = launch(args, env={"PYTHONPATH": str(PROGRAMS / "kill_during_save")})
    assert proc.returncode == -9
    assert (out / "checkpoints" / "step4").is_dir()  # the save had begun...
    assert (out / "checkpoints" / "latest").read_text() == "step2"  # ...but latest still names step 2
    check_ok(launch(args))  # resume auto from step 2, redo steps 3-6
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    assert [s for s, _ in losses(out)] == list(range(1, 7))


def test_checkpoint_of_another_model_is_refused(runs, tmp_path, data_cache):
    wider = tmp_path / "wider.json"
    config = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    wider.write_text(json.dumps({**config, "n_embd": 128}))
    proc = launch(ckpt_args(tmp_path / "new", data_cache, 0, model=wider,
                            resume=runs(0) / "checkpoints" / "step4"))
    refused(proc)
    assert "another model shape (n_embd: checkpoint 64 vs model 128)" in proc.stderr
    assert not (tmp_path / "new").exists()


def logits_of(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(100, 164).reshape(2, 32)).logits


@pytest.fixture(scope="module")
def engine_logits(runs, tmp_path_factory):
    """Each stage's final checkpoint loaded into a 2-rank DeepSpeed engine: its logits (one launch)."""
    out = tmp_path_factory.mktemp("engine_logits")
    args = [str(a) for stage in range(4) for a in (runs(stage) / "checkpoints" / "step8", out / f"zero{stage}.pt")]
    torchrun = launch_command("torchrun", nproc=2, script=str(PROGRAMS / "engine_logits.py"))
    check_ok(subprocess.run([*torchrun, *args], cwd=REPO, capture_output=True, text=True, timeout=600))
    return {stage: torch.load(out / f"zero{stage}.pt") for stage in range(4)}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_matches_engine_and_zero_to_fp32(runs, engine_logits, tmp_path, stage):
    run = runs(stage)
    exported = AutoModelForCausalLM.from_pretrained(run / "export").eval()  # written at the end of training
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()
    assert {p.name for p in (run / "export").iterdir()} >= {"config.json", "model.safetensors",
                                                            "generation_config.json", "tokenizer.json"}
    torch.testing.assert_close(logits_of(exported), engine_logits[stage], rtol=0, atol=1e-6)
    if stage > 0:  # DeepSpeed's own consolidation script on the same checkpoint (ZeRO 1-3)
        fp32 = tmp_path / "zero_to_fp32"
        subprocess.run([sys.executable, str(run / "checkpoints" / "zero_to_fp32.py"), str(run / "checkpoints"),
                        str(fp32), "--tag", "step8"], check=True, capture_output=True)
        # (its --safe_serialization refuses GPT-2's tied lm_head/wte, so the torch format)
        state = {k: v for f in fp32.glob("*.bin") for k, v in torch.load(f, weights_only=True).items()}
        reference = AutoModelForCausalLM.from_pretrained(run / "export").eval()
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        torch.testing.assert_close(logits_of(exported), logits_of(reference), rtol=0, atol=1e-6)


def test_export_cli_refuses_to_overwrite(runs, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--checkpoint", str(runs(0)),
                           "--output_dir", str(target)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr and (target / "keep.txt").read_text() == "mine"
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--checkpoint", str(runs(0)),
                           "--output_dir", str(tmp_path / "bf16"), "--dtype", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_sigusr1_saves_exits_75_and_resume_finishes(tmp_path, data_cache):
    out = tmp_path / "run"
    args = tiny_args(out, data_cache, max_steps=30, eval_every=0, log_every=1)
    with running(args, tmp_path / "log") as proc:
        wait_for_first_step(proc, out)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=300)
    output = (tmp_path / "log").read_text()
    assert proc.returncode == 75, output[-3000:]
    step = latest_step(out)
    assert 1 <= step < 30 and "stop requested" in output
    check_ok(launch(args))
    assert [s for s, _ in losses(out)] == list(range(1, 31))
