"""perf/ scalars: the FLOP count against torch's own counter, the device peak, and a real run's logs."""
import math
import re

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, TINY_MODEL, check_ok, launch, read_scalars, tiny_args
from medgpt.data import collate
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.model_shape import ModelShape
from medgpt.prompt import IGNORE_INDEX
from medgpt.throughput import measure_peak_tflops, step_flops, table_peak_tflops

PERF_TAGS = ("perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s", "perf/tflops", "perf/mfu",
             "perf/padding_fraction", "perf/peak_mem_gib/rank0")


def model_from(config_file):
    config = transformers.GPT2Config.from_json_file(config_file)
    return config, transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config_file", [TINY_MODEL, REPO / "configs" / "models" / "gpt2-124m.json"])
def test_body_params_are_the_model_without_embeddings(config_file):
    config, model = model_from(config_file)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    # The LM head is tied to wte.
    assert ModelShape.from_config(config).body_params == model.num_parameters() - embeddings


def test_step_flops_match_torch_flop_counter():
    """torch's FlopCounterMode counts every matmul a real forward + backward runs (linear layers,
    attention's bmm, the LM head). One sample per batch, so there is no padding it would count.
    step_flops counts 6 FLOPs per bias and LayerNorm parameter too (the 6N convention), which
    FlopCounterMode does not: (13 * n_layer + 2) * n_embd parameters next to 12 * n_layer * n_embd^2
    in the matmuls, 1.7% of the body at the tiny model's width 64 (0.1% at GPT-2's 768)."""
    torch.manual_seed(0)
    config, model = model_from(TINY_MODEL)
    lengths, answers = [37, 100, 64], [1, 3, 2]
    counted, answer_tokens = 0, 0
    for n, a in zip(lengths, answers, strict=True):
        input_ids = torch.randint(0, config.vocab_size, (1, n))
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[0, n - a:] = input_ids[0, n - a:]
        answer_tokens += count_label_tokens(labels)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
        with FlopCounterMode(display=False) as counter:
            label_loss_sum(model, batch).backward()
        counted += counter.get_total_flops()
    assert answer_tokens == sum(answers)
    ours = step_flops(config, torch.tensor(lengths), answer_tokens)
    assert counted <= ours <= counted * 1.02, (ours, counted)


def test_collate_counts_real_tokens_only():
    rows = [{"input_ids": [5] * n, "labels": [IGNORE_INDEX] * n} for n in (3, 7, 5)]
    batch = collate(rows, pad_id=0)
    assert batch["sample_lengths"].tolist() == [3, 7, 5]
    assert batch["input_ids"].numel() == 21  # padded to 3 x 7; 15 of them are real


def test_measured_peak_is_positive_and_finite():
    tflops = measure_peak_tflops(torch.device("cpu"), torch.float32)
    assert math.isfinite(tflops) and 0 < tflops < 100  # no CPU reaches 100 fp32 TFLOPS


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA A10G", "bf16", 125.0), ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA L4", "fp16", 121.0), ("Tesla V100-SXM2-32GB", "fp16", 125.0), ("Tesla V100-SXM2-32GB", "bf16", None),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2), ("Some Future GPU", "bf16", None),
])
def test_gpu_table_takes_the_most_specific_name(name, dtype, peak):
    assert table_peak_tflops(name, dtype) == peak


@pytest.mark.e2e
def test_two_rank_run_logs_perf_scalars(two_rank_reference):
    """The 2-rank torchrun run (conftest): every perf/ scalar at every step, with sane values."""
    scalars = read_scalars(two_rank_reference)
    steps = [s for s, _ in scalars["train/loss"]]
    for tag in (*PERF_TAGS, "perf/peak_mem_gib/rank1"):
        assert [s for s, _ in scalars[tag]] == steps, tag
    assert "perf/peak_mem_gib/rank2" not in scalars
    values = {tag: dict(series) for tag, series in scalars.items()}
    config = transformers.GPT2Config.from_json_file(TINY_MODEL)
    h, body = config.n_embd, ModelShape.from_config(config).body_params
    for step in steps:
        v = {tag: values[tag][step] for tag in values if tag.startswith("perf/")}
        assert 0 < v["perf/mfu"] <= 1 and v["perf/step_time_s"] > 0
        assert v["perf/peak_mem_gib/rank0"] > 0 and v["perf/peak_mem_gib/rank1"] > 0
        # One step is one global batch: micro 2 x accumulation 2 x 2 ranks.
        assert v["perf/samples_per_s"] * v["perf/step_time_s"] == pytest.approx(8, rel=1e-4)
        # The FLOPs per step lie between what the tokens and answers need at least and at most
        # (samples of <= seq_len 384 tokens; 1 or 2 answer positions: decision, EOS).
        tokens = round(v["perf/tokens_per_s"] * v["perf/step_time_s"])  # TensorBoard keeps float32
        flops = v["perf/tflops"] * 1e12 * v["perf/step_time_s"]
        assert 8 * 32 <= tokens <= 8 * 384
        # Rows are padded to the longest of their micro-batch of 2: padding is there, and below half.
        assert 0 <= v["perf/padding_fraction"] < 0.5
        # Attention's sum of squared lengths is at least tokens^2 / samples (equal lengths).
        low = (6 * body * tokens + 12 * config.n_layer * h * tokens**2 / 8
               + 6 * h * config.vocab_size * 8)
        high = (6 * body * tokens + 12 * config.n_layer * h * 384 * tokens
                + 6 * h * config.vocab_size * 16)
        assert low * 0.999 <= flops <= high * 1.001
    # MFU is achieved / peak with one peak for the run: the implied peak is a CPU's (1 GFLOPS..10 TFLOPS).
    implied = {values["perf/tflops"][s] / values["perf/mfu"][s] for s in steps}
    assert max(implied) == pytest.approx(min(implied), rel=1e-4) and 1e-3 < min(implied) / 2 < 10


@pytest.mark.e2e
def test_peak_tflops_flag_sets_the_peak(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = launch(tiny_args(out, data_cache, max_steps=3, eval_every=0, peak_tflops=1.0))
    check_ok(proc)
    assert re.search(r"MFU against 1 TFLOPS per device \(--peak_tflops\) x 1 rank", proc.stdout), proc.stdout
    scalars = read_scalars(out)
    tflops, mfu = dict(scalars["perf/tflops"]), dict(scalars["perf/mfu"])
    assert sorted(mfu) == [1, 2, 3]
    for step, value in mfu.items():
        assert value == pytest.approx(tflops[step] / 1.0, rel=1e-5)
    # The progress line (stderr is no terminal here: plain lines on stdout, medgpt/progress.py).
    assert re.search(r"train: step 3/3 \| loss [\d.]+ \| lr \S+ \| tok/s \S+ \| mfu [\d.]+%", proc.stdout), proc.stdout
