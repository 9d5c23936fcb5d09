"""LoRA through peft: only the adapters train (base weights bit-identical) under ZeRO 0-3 and both
launchers, bit-exact resume, and an export that loads without peft and computes what the peft model does."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import (
    PROGRAMS,
    REPO,
    TINY_MODEL,
    TRAIN_PY,
    check_ok,
    ckpt_args,
    launch,
    losses,
    refused,
    snapshot,
    stopped_at,
)
from medgpt.checkpoint import read_meta
from medgpt.config import Config, ModelConfig, parse_config
from medgpt.errors import UserError
from medgpt.export import MODEL_STATES, export_checkpoint, fp32_state_dict, training_module
from medgpt.lora import ADAPTER_DIR, check_same_lora, lora_config
from medgpt.memory_plan import Strategy, load_shape, lora_params, model_states
from medgpt.safe_load import load_weights

peft = pytest.importorskip("peft")  # the lora extra; the refusal without it is tested below with peft hidden

BATCH = torch.arange(100, 164).reshape(2, 32)  # the batch of tests/programs/saved_logits.py
STOP = 2


def merge_tolerance(config: GPT2Config) -> float:
    """Merged (x @ (W + s B A)) and unmerged (x @ W + s (x @ A) @ B) fp32 weights round differently.
    A dot product of K terms is exact to K x unit roundoff relative to sum |x w| (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., eq. 3.5); K is at most the MLP width, and each
    of the n_layer blocks adds its share to the residual stream the logits read."""
    return config.n_layer * (config.n_inner or 4 * config.n_embd) * torch.finfo(torch.float32).eps


def base_name(name: str) -> str:
    """A peft model's parameter name -> the same weight's name in the plain GPT-2."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def peft_logits(base: dict[str, torch.Tensor], config: GPT2Config, adapter: Path) -> torch.Tensor:
    """The peft model's logits (adapters unmerged): the base weights plus the exported adapter."""
    model = GPT2LMHeadModel(config)
    model.load_state_dict(base, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, adapter).eval()(input_ids=BATCH).logits


def check_base_unchanged(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> set[str]:
    """Every non-adapter weight of a checkpoint bit-identical to the initial model; returns the adapters."""
    adapters = {name for name in state if ".lora_" in name}
    assert adapters
    for name, value in state.items():
        if name not in adapters:
            assert torch.equal(value, initial[base_name(name)]), name
    return adapters


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory) -> Path:
    """2 LoRA steps on 2 ranks under torchrun for each ZeRO stage (tests/programs/lora_stages.py)."""
    out = tmp_path_factory.mktemp("lora-stages")
    check_ok(launch([str(out), "4", "0", "1", "2", "3"], launcher="torchrun", nproc=2,
                    script=str(PROGRAMS / "lora_stages.py")))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_only_adapters_train_under_every_zero_stage(stage_runs, stage, tmp_path):
    tag = stage_runs / f"zero{stage}" / "checkpoints" / "step2"
    meta = read_meta(tag)
    config = GPT2Config.from_dict(meta.model_config)
    module = training_module(config, meta.config.model)
    initial = {base_name(k): v for k, v in torch.load(stage_runs / "initial.pt", weights_only=True).items()
               if ".lora_" not in k}  # the base model's weights as the program saved them, adapters added
    state = fp32_state_dict(tag, module)
    adapters = check_base_unchanged(state, initial)
    assert adapters == {name for name, p in module.named_parameters() if p.requires_grad}
    assert all(state[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # trained: they start at 0
    # DeepSpeed's optimizer holds the adapters and nothing else.
    if stage == 0:
        groups = load_weights(tag / MODEL_STATES)["optimizer"]["param_groups"]
        assert sum(len(group["params"]) for group in groups) == len(adapters)
    else:
        held = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, exclude_frozen_parameters=True)
        assert set(held) == adapters

    export = export_checkpoint(tag, tmp_path / "export")
    merged = GPT2LMHeadModel.from_pretrained(export).eval()
    for name in ("transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.ln_f.bias"):
        assert torch.equal(merged.state_dict()[name], initial[name])  # no adapter there: untouched
    with torch.no_grad():
        got = merged(input_ids=BATCH).logits
    tol = merge_tolerance(config)
    torch.testing.assert_close(got, peft_logits(initial, config, export / ADAPTER_DIR), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 'pretrained' tiny GPT-2 folder: under ZeRO-3 it loads inside zero.Init, partitioned before
    peft adds the adapters."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config.from_json_file(TINY_MODEL)).save_pretrained(folder)
    return folder


def lora_args(out: Path, cache: Path, model: Path) -> list[str]:
    return ckpt_args(out, cache, 3, model=model, lora_r=4, lora_dropout=0.1, max_steps=4, seq_len=128,
                     eval_batch_size=50)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_cache, pretrained) -> Path:
    """launcher/train.py with LoRA under ZeRO-3, deepspeed launcher, 2 ranks, from the pretrained folder."""
    out = tmp_path_factory.mktemp("lora-zero3")
    check_ok(launch(lora_args(out, data_cache, pretrained), launcher="deepspeed", nproc=2))
    return out


@pytest.mark.e2e
def test_resume_is_bit_exact_with_the_other_launcher(lora_run, tmp_path, data_cache, pretrained):
    resumed = stopped_at(lora_run, tmp_path / "resumed", STOP)
    check_ok(launch(lora_args(resumed, data_cache, pretrained), launcher="torchrun", nproc=2))
    got, want = losses(resumed), losses(lora_run)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert got[STOP:] == want[STOP:]  # lora dropout on: the restored RNG draws the same masks


@pytest.mark.e2e
def test_export_loads_without_peft_and_equals_the_peft_model(lora_run, pretrained, tmp_path):
    initial = GPT2LMHeadModel.from_pretrained(pretrained).state_dict()
    final = lora_run / "checkpoints" / "step4"
    meta = read_meta(final)
    config = GPT2Config.from_dict(meta.model_config)
    check_base_unchanged(fp32_state_dict(final, training_module(config, meta.config.model)), initial)
    export = lora_run / "export"
    adapter_config = json.loads((export / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["base_model_name_or_path"]) == (4, str(pretrained))
    assert not (export / "adapter_config.json").exists()  # else transformers would load it as an adapter

    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, str(PROGRAMS / "without_peft.py"), str(PROGRAMS / "saved_logits.py"),
                           str(export), str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert (saved["class"], saved["peft_found"]) == ("GPT2LMHeadModel", False)
    tol = merge_tolerance(config)
    torch.testing.assert_close(saved["logits"], peft_logits(initial, config, export / ADAPTER_DIR), rtol=tol, atol=tol)


@pytest.mark.e2e
def test_lora_without_peft_is_refused(tmp_path):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    proc = launch([TRAIN_PY, "--config", "configs/smoke.yaml", "--output_dir", str(out), "--lora_r", "8"],
                  script=str(PROGRAMS / "without_peft.py"))
    assert any("needs peft" in line and "medgpt[lora]" in line for line in refused(proc))
    assert snapshot(tmp_path) == before


def test_lora_flags_are_validated():
    with pytest.raises(UserError) as err:
        parse_config(["--lora_r", "8", "--lora_targets", "c_attn,wte", "--lora_alpha", "0", "--lora_dropout", "1"])
    assert len(err.value.problems) == 3 and "unknown: wte" in err.value.problems[0]
    with pytest.raises(UserError, match="lora_r must be >= 0"):
        parse_config(["--lora_r", "-1"])
    assert parse_config(["--lora_r", "8"]).model.lora_modules == ["c_attn", "c_proj", "c_fc"]


def test_resume_with_other_adapters_is_refused(tmp_path):
    meta = SimpleNamespace(config=Config(model=ModelConfig(model="gpt2", lora_r=8)))  # medgpt.json's part it reads
    check_same_lora(meta, ModelConfig(lora_r=8), tmp_path)
    for other in (ModelConfig(lora_r=0), ModelConfig(lora_r=4), ModelConfig(lora_r=8, lora_targets="c_attn")):
        with pytest.raises(UserError, match="other LoRA settings"):
            check_same_lora(meta, other, tmp_path)
    before_lora = Config.from_dict({"model": {"model": "gpt2"}})  # a config saved before LoRA existed
    check_same_lora(SimpleNamespace(config=before_lora), ModelConfig(), tmp_path)


def test_plan_counts_adapters_and_freezes_the_model():
    shape = load_shape(str(TINY_MODEL))  # hidden 64, MLP 256, 2 layers
    per_layer = 4 * ((64 + 3 * 64) + (64 + 64) + (256 + 64) + (64 + 256))  # r x (in + out): c_attn, 2 c_proj, c_fc
    targets = ["c_attn", "c_proj", "c_fc"]
    assert lora_params(shape, 4, targets) == 2 * per_layer == 8192
    with torch.device("meta"):  # peft's own count on the real module
        model = peft.get_peft_model(GPT2LMHeadModel(GPT2Config.from_json_file(TINY_MODEL)),
                                    lora_config(ModelConfig(lora_r=4)))
    assert model.get_nb_trainable_parameters() == (8192, shape.num_params + 8192)
    assert lora_params(shape, 4, ["c_fc"]) == 2 * 4 * (64 + 256)
    # fp32, 2 GPUs: frozen model kept as parameters (4 bytes each; sharded at ZeRO-3); gradients (4 bytes, fp32
    # partition) and master + Adam moments (12 bytes) for the adapters only, sharded over the 2 GPUs from ZeRO-1.
    total, a = shape.num_params + 8192, 8192
    zero0 = model_states(Strategy(0), shape, "fp32", 2, 1, zero_init=False, adapters=a)
    assert (zero0.params, zero0.grads, zero0.optimizer) == (4 * total, 4 * a, 8 * a)
    zero2 = model_states(Strategy(2), shape, "fp32", 2, 1, zero_init=False, adapters=a)
    assert (zero2.params, zero2.grads, zero2.optimizer) == (4 * total, 4 * a // 2 + 4 * a // 2, 12 * a // 2)
    zero3 = model_states(Strategy(3), shape, "fp32", 2, 1, zero_init=False, adapters=a)
    gathered = 4 * shape.largest_layer_params
    assert (zero3.params, zero3.grads, zero3.optimizer) == (gathered + 4 * total // 2, 4 * a // 2, 12 * a // 2)
