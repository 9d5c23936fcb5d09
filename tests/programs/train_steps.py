"""Test helper: build the DeepSpeed engine the way training does, run a few of medgpt's training
steps on fixed random micro-batches, and print one JSON line (rank 0).

    train_steps.py <ds_config.json> <model .json> <steps> [--activation_checkpointing] [--compile]

The same two micro-batches (per rank) every step, so a model that learns lowers the loss step
after step. Printed: ``losses`` and ``grad_norms`` per step, the ``optimizer`` DeepSpeed built,
the model's ``is_activation_checkpointing``, ``mlp_forwards`` (GPT2MLP forward calls during one
step: each block once per micro-batch, twice with recomputation), ``compiled`` (the engine's
flag) and each rank's ``peak_memory_gib``.
"""
import argparse
import json

import deepspeed
import torch

from medgpt.compilation import compile_engine
from medgpt.config import Config, ModelConfig
from medgpt.data import collate
from medgpt.distributed import init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.model import build_model, load_model_config
from medgpt.shutdown import exit_process
from medgpt.train import train_step

parser = argparse.ArgumentParser()
parser.add_argument("ds_config")
parser.add_argument("model")
parser.add_argument("steps", type=int)
parser.add_argument("--activation_checkpointing", action="store_true")
parser.add_argument("--compile", action="store_true")
args = parser.parse_args()

dist = init_distributed("cpu")
cfg = Config()
cfg.model = ModelConfig(model=args.model, dropout=0.0, activation_checkpointing=args.activation_checkpointing)
cfg.train.precision, cfg.train.micro_batch_size, cfg.train.grad_accum = "fp32", 2, 2
cfg.optim.lr = 1e-3
model_config = load_model_config(cfg.model)
ds_config = resolve_ds_config(load_ds_config(args.ds_config), cfg, dist.world_size, total_steps=args.steps,
                              hidden_size=model_config.n_embd, on_gpu=False)
model, hf_deepspeed_config = build_model(cfg.model, model_config, ds_config, seed=0)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
if args.compile:
    compile_engine(engine)

mlp_forwards = []
for block in engine.module.transformer.h:  # a recomputation runs the block's modules again
    def counted(*inputs, _forward=block.mlp.forward, **kwargs):
        mlp_forwards.append(1)
        return _forward(*inputs, **kwargs)
    block.mlp.forward = counted


def micro_batch(seed: int) -> dict[str, torch.Tensor]:
    """Two rows of random tokens of different lengths, the last 4 tokens of each labelled."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, model_config.vocab_size, (n,), generator=g).tolist() for n in (40, 33)]
    return collate([{"input_ids": r, "labels": [-100] * (len(r) - 4) + r[-4:]} for r in rows], pad_id=0)


batches = [micro_batch(100 * dist.rank + i) for i in range(2)]
losses, norms, forwards = [], [], []
for _ in range(args.steps):
    mlp_forwards.clear()
    stats = train_step(engine, batches, dist, stop_requested=False, grad_clip=cfg.optim.grad_clip)
    losses.append(stats.loss)
    norms.append(stats.grad_norm)
    forwards.append(len(mlp_forwards))
if dist.is_main:
    print(json.dumps({"losses": losses, "grad_norms": norms, "optimizer": type(engine.basic_optimizer).__name__,
                      "activation_checkpointing": engine.module.is_activation_checkpointing,
                      "mlp_forwards": forwards, "compiled": engine.is_compiled,
                      "peak_memory_gib": [b / 2**30 for b in stats.peak_memory]}), flush=True)

exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
