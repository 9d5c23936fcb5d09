"""The memory planner against the real thing: parameter counts of real GPT-2 models, DeepSpeed's
own estimators, activations kept by autograd in a real forward, and the CLI as a user runs it."""

import pytest
import torch
import transformers
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as zero3_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from conftest import REPO, TINY_MODEL, check_ok, launch, refused
from medgpt.loss import label_loss_sum
from medgpt.memory_plan import (
    GPT2_SIZES,
    Strategy,
    Workload,
    activation_bytes,
    layer_activation_bytes,
    load_shape,
    model_states,
    plan,
)
from medgpt.model_shape import ModelShape

PLAN_PY = str(REPO / "launcher" / "plan.py")


def meta_model(config: transformers.GPT2Config) -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("model", [str(TINY_MODEL), "gpt2-xl", "gpt2-medium"])
def test_parameter_count_is_the_real_models(model):
    config = (transformers.GPT2Config.from_json_file(model) if model.endswith(".json")
              else transformers.GPT2Config(**GPT2_SIZES[model]))
    real = meta_model(config)
    shape = load_shape(model)
    assert shape.num_params == real.num_parameters()  # counts the tied lm_head once
    assert shape.largest_layer_params == zero3_model_to_params(real)[1]


def test_untied_head_and_custom_mlp_width_count(tmp_path):
    config = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=96, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)  # a save_pretrained folder is a model input too
    assert load_shape(str(tmp_path)).num_params == meta_model(config).num_parameters()


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (4, 2)])
def test_zero2_and_zero3_match_deepspeeds_estimators(gpus, nodes):
    shape = load_shape("gpt2-xl")
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.num_params, gpus, nodes, cpu_offload=offload)
        states = model_states(Strategy(2, offload), shape, "bf16", gpus, nodes, zero_init=True)
        assert (states.gpu, states.cpu) == pytest.approx((gpu, cpu), abs=2)  # int() rounding of parts
    for offload_optimizer, offload_param in ((False, False), (True, False), (True, True)):
        for zero_init in (False, True):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                shape.num_params, shape.largest_layer_params, gpus, nodes, cpu_offload=offload_optimizer,
                cpu_offload_params=offload_param, zero_init=zero_init)
            states = model_states(Strategy(3, offload_optimizer, offload_param), shape, "fp16", gpus, nodes,
                                  zero_init)
            assert (states.gpu, states.cpu) == pytest.approx((gpu, cpu), abs=2)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_more_sharding_never_needs_more_gpu_memory(precision):
    shape = load_shape("gpt2-large")
    for gpus in (2, 8):
        per_gpu = [model_states(Strategy(stage), shape, precision, gpus, 1, True) for stage in range(4)]
        # (fp32 on 2 GPUs: ZeRO-1's fp32 master copy costs what sharding the moments saves)
        assert per_gpu[3].gpu < per_gpu[2].gpu < per_gpu[1].gpu <= per_gpu[0].gpu
        assert per_gpu[1].gpu < per_gpu[0].gpu or (precision, gpus) == ("fp32", 2)
        # ZeRO-0 holds fp32 weights (plus autocast's copy in bf16); ZeRO-1/2 the 16-bit ones whole
        assert per_gpu[0].params >= per_gpu[1].params == per_gpu[2].params > per_gpu[3].params
        offloaded = [model_states(s, shape, precision, gpus, 1, True)
                     for s in (Strategy(1, True), Strategy(2, True), Strategy(3, True), Strategy(3, True, True))]
        assert all(o.optimizer == 0 for o in offloaded)
        assert [o.gpu for o in offloaded] == sorted((o.gpu for o in offloaded), reverse=True)
    # one GPU: nothing to shard; mixed-precision ZeRO-0 (autocast) holds 4 + 2 (the bf16 copy) + 4 + 8 bytes
    assert model_states(Strategy(0), shape, "bf16", 1, 1, True).gpu == 18 * shape.num_params
    assert model_states(Strategy(0), shape, "fp32", 1, 1, True).gpu == 16 * shape.num_params


def test_checkpointing_reduces_activations_and_rows_cover_every_layout():
    shape = load_shape("gpt2")
    work = Workload(micro_batch=8, seq_len=1024, precision="bf16")
    assert activation_bytes(shape, work, checkpointing=True) < activation_bytes(shape, work, False) / 5
    rows = plan(shape, work, gpus_per_node=4, nodes=1, zero_init=True)
    assert len(rows) == 16 and len({(r.strategy, r.checkpointing) for r in rows}) == 16
    eager = Workload(micro_batch=8, seq_len=1024, precision="bf16", attention="eager")
    assert layer_activation_bytes(shape, eager) > layer_activation_bytes(shape, work)


def saved_activation_bytes(config: transformers.GPT2Config, dtype: torch.dtype, attention: str, batch: int,
                           seq_len: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps for backward during medgpt's forward and loss
    (parameters excluded), each storage once: what activation memory is, measured on CPU."""
    torch.manual_seed(0)
    config._attn_implementation = attention
    model = transformers.GPT2LMHeadModel(config).to(dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    labels = torch.full((batch, seq_len), -100)
    labels[:, -2:] = 7  # a two-token answer at the end of each sample, as medgpt's prompts end
    batch_inputs = dict(input_ids=torch.randint(0, config.vocab_size, (batch, seq_len)),
                        attention_mask=torch.ones(batch, seq_len, dtype=torch.long), labels=labels)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        label_loss_sum(model, batch_inputs)
    return sum(kept.values())


@pytest.mark.parametrize("attention,dtype", [("sdpa", torch.bfloat16), ("eager", torch.bfloat16),
                                             ("sdpa", torch.float32)])
def test_activation_estimate_matches_what_autograd_keeps(attention, dtype):
    # No dropout: CPU dropout keeps p-byte masks (CUDA: 1-byte) and CPU SDPA with dropout takes
    # its math path, so only the dropout-free forward is the GPU's on CPU.
    batch, seq_len = 2, 128
    precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    work = Workload(batch, seq_len, precision, attention, dropout=False, label_tokens=2)
    configs = {layers: transformers.GPT2Config(n_embd=128, n_head=4, n_layer=layers, vocab_size=1000, bos_token_id=0,
                                               eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
               for layers in (2, 4)}
    measured = {layers: saved_activation_bytes(config, dtype, attention, batch, seq_len, False)
                for layers, config in configs.items()}
    shape = ModelShape.from_config(configs[4])
    per_layer = (measured[4] - measured[2]) / 2
    assert per_layer == pytest.approx(layer_activation_bytes(shape, work), rel=0.02)
    # The estimate also counts the logits' gradient, made in backward: the forward keeps the rest.
    logits_grad = batch * 2 * shape.vocab_size * 4
    assert measured[4] == pytest.approx(activation_bytes(shape, work, False) - logits_grad, rel=0.03)
    # Checkpointing: the forward keeps the block inputs; backward recomputes one block at a time.
    kept = saved_activation_bytes(configs[4], dtype, attention, batch, seq_len, True)
    recomputed = layer_activation_bytes(shape, work)
    assert kept + recomputed == pytest.approx(activation_bytes(shape, work, True) - logits_grad, rel=0.03)


@pytest.mark.e2e
def test_cli_prints_the_table_and_a_recommendation():
    proc = launch(["--model", "gpt2-xl", "--gpus", "8", "--gpu_mem", "36", "--micro_batch_size", "8"],
                  script=PLAN_PY, timeout=120)
    check_ok(proc)
    lines = proc.stdout.splitlines()  # (on CPU DeepSpeed first logs "Setting accelerator to CPU")
    assert any(line.startswith("model gpt2-xl: 1,557,611,200 parameters") for line in lines)
    table = [line.split() for line in lines if line[:4].strip().isdigit()]
    assert len(table) == 16
    fits = {(r[0], r[1], r[2]): r[-2:] != ["not", "fit"] for r in table}
    # 8 x 1024 tokens x 48 layers of bf16 activations (34 GiB) fit no layout's 32 GiB budget
    # without checkpointing; with it, all do, ZeRO-0 first.
    assert not any(fit for (_, _, ckpt), fit in fits.items() if ckpt == "no")
    assert all(fit for (_, _, ckpt), fit in fits.items() if ckpt == "yes")
    assert lines[-1].startswith("recommended: ZeRO-0, offload none, activation checkpointing on")


@pytest.mark.e2e
@pytest.mark.parametrize("args,message", [
    (["--model", "gpt3"], "neither a GPT-2 Hub name"),
    (["--model", "configs/models/absent.json"], "does not exist"),
    (["--model", str(TINY_MODEL), "--gpus", "0"], "--gpus must be >= 1"),
    (["--model", "gpt2", "--seq_len", "2048"], "exceeds the model's 1024 positions"),
])
def test_cli_bad_input_is_one_clear_error(args, message):
    proc = launch(args, script=PLAN_PY, timeout=120)
    assert any(message in line for line in refused(proc))
