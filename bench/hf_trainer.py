"""The baseline of bench/bench.py: fine-tuning GPT-2 on PubMedQA the way a Hugging Face Trainer
user would write it, on the same data, prompt, model shape and DeepSpeed JSON as medgpt.

    torchrun --nproc_per_node 2 bench/hf_trainer.py --model configs/models/tiny.json --output_dir /tmp/hf

What a typical user writes, and nothing more: ``GPT2LMHeadModel`` called with ``labels`` (full LM
head, transformers' own loss), ``DataCollatorForSeq2Seq`` padding each batch to its longest row
(pad = EOS, label pad -100), the Trainer's default random sampler, DeepSpeed through
``TrainingArguments(deepspeed=...)`` (which fills the JSON's "auto" values), no evaluation, no
saving, no reporting. The data and prompt are medgpt's own (medgpt.data.tokenized_dataset), so
both sides train on identical token sequences.

Measurement only, outside the training math: a callback records each optimizer step's end time
(wall clock) and the non-pad tokens, padded positions and model FLOPs (medgpt.throughput.step_flops,
the formula medgpt reports) of the micro-batches it consumed; every rank writes them with its
peak memory to ``<output_dir>/bench_rank<r>.json`` at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import PartialState
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from medgpt.config import DataConfig
from medgpt.data import tokenized_dataset
from medgpt.distributed import Dist
from medgpt.pubmedqa import load_records, official_split
from medgpt.throughput import peak_memory_bytes, step_flops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="GPT2Config .json (random init)")
    p.add_argument("--tokenizer", default="../shared/data/gpt2-tokenizer")
    p.add_argument("--data", default="../shared/data/pubmedqa/ori_pqal.json")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--cache_dir", default="", help="medgpt's tokenized-data cache")
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


class StepMeter(TrainerCallback):
    """Per optimizer step: end time, non-pad tokens, padded positions, model FLOPs (this rank).

    Counts stay on the device until the end, so measuring adds no synchronisation to a step but
    the one that makes its end time true on a GPU.
    """

    def __init__(self, model_config: GPT2Config, output_dir: Path) -> None:
        self.model_config, self.output_dir = model_config, output_dir
        self.pending: list[dict[str, torch.Tensor]] = []
        self.steps: list[list[dict[str, torch.Tensor]]] = []
        self.end_times: list[float] = []

    def add_batch(self, inputs: dict[str, torch.Tensor]) -> None:
        self.pending.append({"lengths": inputs["attention_mask"].sum(dim=1),
                             "positions": torch.tensor(inputs["input_ids"].numel()),
                             "answers": (inputs["labels"][:, 1:] != -100).sum()})

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end_times.append(time.time())
        self.steps.append(self.pending)
        self.pending = []

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        rows = []
        for batches in self.steps:
            rows.append({"tokens": sum(int(b["lengths"].sum()) for b in batches),
                         "positions": sum(int(b["positions"]) for b in batches),
                         "flops": sum(step_flops(self.model_config, b["lengths"].cpu(), int(b["answers"]))
                                      for b in batches)})
        stats = {"end_times": self.end_times, "steps": rows, "peak_mem_bytes": peak_memory_bytes(args.device)}
        (self.output_dir / f"bench_rank{args.process_index}.json").write_text(json.dumps(stats))


class MeteredTrainer(Trainer):
    """The stock Trainer; compute_loss only shows each micro-batch to the meter first."""

    def __init__(self, *args: Any, meter: StepMeter, **kwargs: Any) -> None:
        super().__init__(*args, callbacks=[meter], **kwargs)
        self.meter = meter

    def compute_loss(self, model, inputs, *args, **kwargs):  # type: ignore[override]
        self.meter.add_batch(inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)


def main() -> None:
    a = parse_args()
    output_dir = Path(a.output_dir)
    accelerator_config = None
    if not torch.cuda.is_available():
        # accelerate picks no process-group backend for DeepSpeed on a machine without GPUs (the
        # ranks would each think they are alone): name gloo, and let the Trainer use that state.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}
    args = TrainingArguments(
        output_dir=str(output_dir), deepspeed=a.ds_config, bf16=a.precision == "bf16",
        per_device_train_batch_size=a.micro_batch_size, gradient_accumulation_steps=a.grad_accum,
        max_steps=a.max_steps, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup_steps,
        seed=a.seed, save_strategy="no", eval_strategy="no", report_to="none", accelerator_config=accelerator_config)

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    # medgpt's prompt and tokenization, read from (or written to) medgpt's cache.
    records = load_records(a.data)
    dist = Dist(rank=args.process_index, world_size=args.world_size, local_rank=args.local_process_index,
                device=args.device)
    tokens = tokenized_dataset(records, tokenizer, DataConfig(data=a.data, fold=a.fold, seq_len=a.seq_len,
                                                              cache_dir=a.cache_dir), dist)
    train_set = tokens.select(official_split(records, a.fold).train)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token

    transformers.set_seed(a.seed)
    config = GPT2Config.from_json_file(a.model)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = a.dropout
    model = GPT2LMHeadModel(config)

    meter = StepMeter(config, output_dir)
    trainer = MeteredTrainer(model=model, args=args, train_dataset=train_set, meter=meter,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer.train()
    # A gloo group left open at interpreter exit can abort it ("terminate called without an active
    # exception", exit -6) once the other rank has gone: close it, as medgpt's own jobs do.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
