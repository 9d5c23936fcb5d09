"""End to end: the real entry point, real DeepSpeed, 2 ranks on gloo."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROGRAMS, REPO, TINY_MODEL, check_ok, launch, read_scalars, tiny_args
from medgpt.config import ModelConfig
from medgpt.distributed import free_port
from medgpt.model import build_model, load_model_config

STEPS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """One process, global batch 8 = micro 2 x accumulation 4."""
    out = tmp_path_factory.mktemp("reference")
    check_ok(launch(tiny_args(out, data_cache, grad_accum=4, max_steps=STEPS)))
    return out


def losses(scalars, tag="train/loss"):
    return dict(scalars[tag])


@pytest.mark.e2e
@pytest.mark.parametrize("stage, launcher", [(0, "torchrun"), (1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_two_ranks_match_one_process(reference, tmp_path, data_cache, stage, launcher):
    """2 ranks x accumulation 2 see the same global batches as 1 rank x accumulation 4, and the
    loss is normalised over the global batch, so every step's loss agrees."""
    out, port = tmp_path / "run", free_port()
    proc = launch(tiny_args(out, data_cache, grad_accum=2, max_steps=STEPS,
                            ds_config=REPO / "ds_configs" / f"zero{stage}.json"), launcher=launcher, nproc=2,
                  master_port=port)
    check_ok(proc)
    # DeepSpeed's CPU allreduce leaves a shared-memory file per rank; medgpt removes them at exit.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    ref, got = read_scalars(reference), read_scalars(out)
    assert sorted(losses(got)) == list(range(1, STEPS + 1))
    for step, value in losses(ref).items():
        assert math.isclose(losses(got)[step], value, rel_tol=1e-5), (step, losses(got)[step], value)
    for step, value in losses(ref, "train/grad_norm").items():  # reported by every ZeRO stage alike
        assert math.isclose(losses(got, "train/grad_norm")[step], value, rel_tol=1e-4)
    for step, value in losses(ref, "eval/loss").items():
        assert math.isclose(losses(got, "eval/loss")[step], value, rel_tol=1e-5)
    # Training did something: the loss fell from its random-init value.
    assert losses(got)[STEPS] < losses(got)[1] - 0.5


@pytest.mark.e2e
def test_activation_checkpointing_keeps_the_losses(reference, tmp_path, data_cache):
    """Recomputing activations under ZeRO-3 on 2 ranks trains exactly like storing them."""
    out = tmp_path / "run"
    check_ok(launch(tiny_args(out, data_cache, grad_accum=2, max_steps=STEPS, activation_checkpointing="on",
                              eval_every=0, ds_config=REPO / "ds_configs" / "zero3.json"),
                    launcher="torchrun", nproc=2))
    got, ref = losses(read_scalars(out)), losses(read_scalars(reference))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, value in ref.items():
        assert math.isclose(got[step], value, rel_tol=1e-5), (step, got[step], value)


@pytest.mark.parametrize("enabled", [False, True])
def test_activation_checkpointing_recomputes_every_block(enabled):
    """With the switch on, each block runs its forward again during backward."""
    cfg = ModelConfig(model=str(TINY_MODEL), dropout=0.0, activation_checkpointing=enabled)
    model = build_model(cfg, load_model_config(cfg), ds_config={}, seed=0)[0].train()
    calls = []

    def counted(forward):
        def run(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return run
    for block in model.transformer.h:  # the recompute runs the block's modules (not their hooks) again
        block.mlp.forward = counted(block.mlp.forward)
    ids = torch.arange(100, 132).reshape(2, 16)
    loss = model(input_ids=ids, labels=ids).loss
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == len(model.transformer.h)
    assert len(calls) == forward_calls * (2 if enabled else 1)


@pytest.mark.e2e
def test_tensorboard_and_resolved_config(reference):
    scalars = read_scalars(reference)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s"):
        assert [step for step, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
    assert [step for step, _ in scalars["eval/loss"]] == [5, 10]
    assert all(v > 0 for _, v in scalars["perf/tokens_per_s"])
    assert "train/loss_scale" not in scalars  # fp16 only
    lrs = [v for _, v in scalars["train/lr"]]
    assert max(lrs) == pytest.approx(1e-3, rel=1e-2) and lrs[-1] < max(lrs)  # warmup, then cosine decay
    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert saved["train"]["grad_accum"] == 4 and saved["data"]["seq_len"] == 384
    assert (reference / "ds_config.json").is_file()


@pytest.mark.e2e
def test_log_every_gives_one_point_per_logged_step(tmp_path, data_cache):
    out = tmp_path / "run"
    check_ok(launch(tiny_args(out, data_cache, max_steps=7, log_every=3, eval_every=0)))
    scalars = read_scalars(out)
    assert [s for s, _ in scalars["train/loss"]] == [3, 6, 7]
    assert [s for s, _ in scalars["eval/loss"]] == [7]


@pytest.mark.e2e
def test_zero3_init_equals_plain_init(tmp_path):
    program = [sys.executable, str(PROGRAMS / "zero3_init_check.py"), str(TINY_MODEL), str(tmp_path / "saved")]
    proc = subprocess.run(program, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ZERO3-INIT-EQUAL" in proc.stdout, proc.stderr[-4000:]
