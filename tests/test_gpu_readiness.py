"""The GPU path's decisions, checked on CPU with real DeepSpeed engines and real runs: which Adam
DeepSpeed builds, where bf16 gradients accumulate, the ZeRO-0/1 bf16 export, the per-step
collectives, the one device choice, and a run that diverges."""
import functools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    PROGRAMS,
    REPO,
    TINY_MODEL,
    check_ok,
    error_lines,
    launch,
    read_scalars,
    refused,
    shm_buffers,
    tiny_args,
)
from medgpt.config import Config
from medgpt.distributed import choose_device, free_port
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.errors import DIVERGED_EXIT, UserError


def resolved(name: str, precision: str = "fp32", on_gpu: bool = False) -> dict:
    cfg = Config()
    cfg.train.precision = precision
    return resolve_ds_config(load_ds_config(str(REPO / "ds_configs" / name)), cfg, world_size=2, total_steps=10,
                             hidden_size=64, on_gpu=on_gpu)


@pytest.mark.parametrize("name", ["zero0.json", "zero1.json", "zero2.json", "zero3.json"])
def test_adam_needs_no_build_step(name):
    """DeepSpeed's "AdamW" is its CUDA FusedAdam, compiled at initialize (nvcc and CUDA_HOME on
    every node): medgpt asks for torch's AdamW, fused (one kernel, no per-tensor read of the step
    count) on a GPU and a CPU alike."""
    for on_gpu in (False, True):
        params = resolved(name, on_gpu=on_gpu)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True


@pytest.mark.parametrize("name", ["zero2_offload.json", "zero3_offload.json"])
def test_offload_keeps_deepspeed_cpu_adam(name):
    assert "torch_adam" not in resolved(name)["optimizer"]["params"]


def test_a_users_optimizer_choice_is_kept(tmp_path):
    raw = {**load_ds_config(str(REPO / "ds_configs" / "zero2.json"))}
    raw["optimizer"] = {"type": "AdamW", "params": {"torch_adam": False}}
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    ds = resolve_ds_config(load_ds_config(str(tmp_path / "ds.json")), Config(), 1, 10, 64, on_gpu=True)
    assert ds["optimizer"]["params"]["torch_adam"] is False and "fused" not in ds["optimizer"]["params"]


@functools.cache  # one launch per engine; the tests read different facts of the same probe
def probe(ds_config: str, precision: str) -> dict:
    """tests/programs/engine_probe.py under torchrun on 2 ranks: what DeepSpeed built, one JSON line."""
    proc = launch([str(REPO / "ds_configs" / ds_config), precision, str(TINY_MODEL)], launcher="torchrun", nproc=2,
                  script=str(PROGRAMS / "engine_probe.py"))
    check_ok(proc)
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


@pytest.mark.e2e
@pytest.mark.parametrize("stage, wrapper", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"),
                                            (3, "DeepSpeedZeroOptimizer_Stage3")])
def test_bf16_gradients_accumulate_in_fp32(stage, wrapper):
    got = probe(f"zero{stage}.json", "bf16")
    assert (got["optimizer"], got["wrapper"], got["accumulates_in"], got["forward_dtype"]) == (
        "AdamW", wrapper, "float32", "bfloat16")


@pytest.mark.e2e
def test_zero0_bf16_is_autocast_over_fp32_weights():
    """At ZeRO-0, DeepSpeed's bf16 would wrap torch's AdamW in FP16_UnfusedOptimizer (runtime/engine.py
    _configure_fp16_optimizer): a cast and an overflow check per parameter tensor every step. medgpt
    turns DeepSpeed's torch autocast on instead: the forward computes in bf16, the optimizer is
    AdamW itself, gradients accumulate in fp32, and there is no loss scale."""
    got = probe("zero0.json", "bf16")
    assert (got["optimizer"], got["wrapper"], got["accumulates_in"], got["loss_scale"], got["forward_dtype"]) == (
        "AdamW", "AdamW", "float32", None, "bfloat16")


@pytest.mark.e2e
@pytest.mark.parametrize("ds_config", ["zero0.json", "zero3.json"])
def test_two_collectives_per_step(ds_config):
    """Counts, then loss + stop flag + peak memory: 2 torch.distributed calls from medgpt per step
    (before: 4, and a host sync per micro-batch). Read from the bf16 probes above (bf16: the GPU
    default; the count does not depend on the precision)."""
    assert probe(ds_config, "bf16")["collectives_per_step"] == [2, 2, 2]


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_checkpoint_exports_its_fp32_master_weights(tmp_path, data_cache, stage):
    """ZeRO-0 trains its fp32 weights under autocast (the module holds them), ZeRO-1 (BF16_Optimizer)
    keeps them in a layout zero_to_fp32 cannot read, ZeRO-3 in files named like BF16_Optimizer's (a
    first GPU run exported it the wrong way): all export their fp32 weights, not a bf16 copy."""
    out = tmp_path / "run"
    check_ok(launch(tiny_args(out, data_cache, precision="bf16", max_steps=2, eval_every=0, seq_len=128,
                              ds_config=REPO / "ds_configs" / f"zero{stage}.json")))
    exported = load_file(out / "export" / "model.safetensors")
    if stage < 3:  # ZeRO-3 saves no whole module: there zero_to_fp32 alone rebuilds the weights
        module = torch.load(out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"]
        assert set(exported) <= set(module)
        for name, weight in exported.items():  # the module holds fp32 weights (ZeRO-0) or their bf16 copy
            assert weight.dtype == torch.float32
            assert torch.equal(weight if stage == 0 else weight.to(torch.bfloat16), module[name])
    wte = exported["transformer.wte.weight"]
    assert not torch.equal(wte, wte.to(torch.bfloat16).float())  # fp32 masters, not the bf16 weights widened


def test_device_choice(monkeypatch):
    assert choose_device("cpu", local_rank=0) == torch.device("cpu")
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    if torch.cuda.is_available():
        pytest.fail("this test describes a machine without a GPU")
    with pytest.raises(UserError, match="--device cuda, but torch sees no GPU"):
        choose_device("cuda", local_rank=0)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(UserError, match=r"should have GPUs \(SLURM_GPUS_ON_NODE=4\).*--device cpu"):
        choose_device("auto", local_rank=0)
    assert choose_device("cpu", local_rank=3) == torch.device("cpu")


@pytest.mark.e2e
def test_gpus_expected_but_unusable_is_an_error_at_start(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = launch(tiny_args(out, data_cache), env={"SLURM_GPUS_ON_NODE": "1"})
    refused(proc)
    assert "should have GPUs (SLURM_GPUS_ON_NODE=1)" in proc.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    """lr 1e6: the loss is non-finite from step 2. Every rank stops there with exit 3 (torchrun
    reports a failed worker as its own exit 1), nothing is exported, step 1 stays latest."""
    out = tmp_path / "run"
    proc = launch(tiny_args(out, data_cache, lr=1e6, warmup_steps=0, save_every=1, max_steps=6, eval_every=0),
                  launcher="torchrun", nproc=2)
    assert proc.returncode == 1 and f"exitcode  : {DIVERGED_EXIT}" in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "diverged at step 2" in errors[0] and "step1" in errors[0], proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step1"
    assert not (out / "export").exists() and not (out / "test_metrics.json").exists()
    assert [s for s, _ in read_scalars(out)["train/loss"]] == [1]


@pytest.mark.e2e
def test_diverging_run_under_the_deepspeed_launcher_exits_3(tmp_path, data_cache):
    """Rank 0 reports and exits 3; launch.py then SIGTERMs rank 1 in its report wait, which must
    still end through its exit handlers: before, it was killed and left its /dev/shm buffer."""
    out, port = tmp_path / "run", free_port()
    proc = launch(tiny_args(out, data_cache, lr=float("1e30"), warmup_steps=0, max_steps=4, eval_every=0),
                  launcher="deepspeed", nproc=2, master_port=port)
    assert proc.returncode == DIVERGED_EXIT, proc.stderr[-3000:]
    assert not (out / "export").exists()
    assert not shm_buffers(port)


@pytest.mark.e2e  # a process that imports torch: seconds
def test_gpu_check_refuses_a_machine_without_a_gpu():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "sees no GPU" in proc.stderr
