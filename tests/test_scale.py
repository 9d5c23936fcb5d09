"""GPT-2 medium / large / XL: the shipped shapes, an XL-wide model trained under ZeRO-3 with CPU
offload, with and without activation checkpointing, and --compile against eager."""
from __future__ import annotations

import json
import math

import pytest
from transformers import GPT2Config

from conftest import PROGRAMS, REPO, TINY_MODEL, check_ok, launch
from medgpt.memory_plan import load_shape

MODELS = REPO / "configs" / "models"
# (n_embd, n_layer, n_head) of the Hub's openai-community/gpt2-{medium,large,xl} config.json.
HUB_SHAPES = {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
XL_STEPS = 3


@pytest.mark.parametrize("name", sorted(HUB_SHAPES))
def test_shipped_configs_are_the_hub_shapes(name):
    config = GPT2Config.from_json_file(MODELS / f"{name}.json")
    assert (config.n_embd, config.n_layer, config.n_head) == HUB_SHAPES[name]
    assert (config.vocab_size, config.n_positions, config.tie_word_embeddings) == (50257, 1024, True)
    # launcher/plan.py plans the Hub name offline from its own table: the same model.
    assert load_shape(str(MODELS / f"{name}.json")) == load_shape(name)


def train_steps(*args: object) -> dict:
    """tests/programs/train_steps.py under torchrun on 2 ranks: one JSON line."""
    proc = launch([str(a) for a in args], launcher="torchrun", nproc=2, script=str(PROGRAMS / "train_steps.py"))
    check_ok(proc)
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


@pytest.fixture(scope="module")
def xl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """GPT-2 XL's width, heads and vocabulary cut to 2 layers (144M parameters, ~3 GiB per rank):
    ZeRO-3 with optimizer and parameter offload, plain and with activation checkpointing. The first
    offload run builds DeepSpeed's CPU Adam (once per environment: ~1.5 min on 2 idle cores)."""
    config = json.loads((MODELS / "gpt2-xl.json").read_text())
    path = tmp_path_factory.mktemp("xl") / "gpt2-xl-2-layers.json"
    path.write_text(json.dumps({**config, "n_layer": 2}))
    ds_config = REPO / "ds_configs" / "zero3_offload.json"
    return {"plain": train_steps(ds_config, path, XL_STEPS),
            "checkpointed": train_steps(ds_config, path, XL_STEPS, "--activation_checkpointing")}


@pytest.mark.e2e
def test_xl_shape_trains_under_zero3_cpu_offload(xl_runs):
    got = xl_runs["plain"]
    assert got["optimizer"] == "DeepSpeedCPUAdam"  # ZeRO-Offload's optimizer: the offload path ran
    assert all(math.isfinite(v) for v in got["losses"] + got["grad_norms"]), got
    # The same batches every step: a model that learns fits them better step after step.
    assert all(b < a for a, b in zip(got["losses"], got["losses"][1:], strict=False)), got["losses"]


@pytest.mark.e2e
def test_xl_activation_checkpointing_recomputes_and_keeps_the_losses(xl_runs):
    plain, checkpointed = xl_runs["plain"], xl_runs["checkpointed"]
    assert (plain["activation_checkpointing"], checkpointed["activation_checkpointing"]) == (False, True)
    # 2 blocks x 2 micro-batches run their MLP once each; recomputation runs every one again in backward.
    assert plain["mlp_forwards"] == [4] * XL_STEPS and checkpointed["mlp_forwards"] == [8] * XL_STEPS
    # Dropout 0: the recomputed forward is the same computation. What may differ is the order in which
    # ZeRO-3 sums gradient contributions (a few fp32 roundings, eps 1.2e-7, amplified by Adam's
    # normalisation over 3 steps): 1e-6 relative, 10x below the 1e-5 a wrong recomputation would exceed.
    for a, b in zip(plain["losses"], checkpointed["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6), (plain["losses"], checkpointed["losses"])


@pytest.mark.e2e
def test_compiled_steps_equal_eager():
    """--compile's hook (medgpt.compilation.compile_engine) against eager: 3 fp32 steps of the tiny
    model on ZeRO-0. Inductor fuses and reorders the reductions (layer norms, softmax, the
    cross-entropy over 50,257 logits); a reordered fp32 sum of K terms differs by about
    log2(K) x eps = 16 x 1.2e-7 = 2e-6 relative, a handful of them per loss: 1e-5, the tolerance of the
    suite's other reordering comparisons (ZeRO stages against one process). The gradient norm
    sums 100k squares: 1e-4."""
    args = [REPO / "ds_configs" / "zero0.json", TINY_MODEL, 3]
    eager, compiled = train_steps(*args), train_steps(*args, "--compile")
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    for a, b in zip(eager["losses"], compiled["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), (eager, compiled)
    for a, b in zip(eager["grad_norms"], compiled["grad_norms"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-4), (eager, compiled)
    assert compiled["losses"][-1] < compiled["losses"][0]
