"""Test helper, run under torchrun: for each ZeRO stage given, build the tiny model with LoRA adapters
as training does, train it 2 steps with medgpt's own train_step on fixed token batches and save a
medgpt checkpoint, ``<output>/zero<stage>/checkpoints/step2``. Rank 0 also saves the model's
initial weights (the same for every stage: same seed) as ``<output>/initial.pt``.

    lora_stages.py <output folder> <lora_r> <stage> [<stage> ...]
"""
import sys
from pathlib import Path

import deepspeed
import torch

from medgpt.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from medgpt.config import parse_config
from medgpt.data import collate
from medgpt.distributed import init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.lora import trainable_parameters
from medgpt.model import build_model, load_model_config, load_tokenizer
from medgpt.model_shape import ModelShape
from medgpt.prompt import IGNORE_INDEX
from medgpt.shutdown import exit_process
from medgpt.train import train_step

output, lora_r, stages = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
dist = init_distributed()


def batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """2 rows of 48 tokens, the last 8 labelled (an answer), different on every rank and step."""
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(100 * step + rank)).tolist()
    return collate([{"input_ids": row, "labels": [IGNORE_INDEX] * 40 + row[40:]} for row in ids], pad_id=0)


for stage in stages:
    out = output / f"zero{stage}"
    cfg = parse_config(["--config", "configs/smoke.yaml", "--lora_r", lora_r, "--lora_dropout", "0.1",
                        "--ds_config", f"ds_configs/zero{stage}.json", "--output_dir", str(out),
                        "--micro_batch_size", "2", "--grad_accum", "1", "--max_steps", "2"])
    model_config = load_model_config(cfg.model)
    ds = resolve_ds_config(load_ds_config(cfg.train.ds_config), cfg, dist.world_size, 2, model_config.n_embd, False)
    model, hf_deepspeed_config = build_model(cfg.model, model_config, ds, seed=cfg.train.seed)
    if dist.is_main and stage == stages[0]:
        torch.save(model.get_base_model().state_dict(), output / "initial.pt")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable_parameters(model), config=ds)
    for step in range(2):
        train_step(engine, [batch(dist.rank, step)], dist, stop_requested=False, grad_clip=cfg.optim.grad_clip)
    meta = CheckpointMeta(config=cfg, model_config=model_config.to_dict(),
                          model_shape=ModelShape.from_config(model_config), global_batch=2 * dist.world_size,
                          zero_stage=stage, optimizer=type(engine.optimizer).__name__)
    save_checkpoint(engine, out, TrainState(step=2), meta, load_tokenizer(cfg.model), dist, keep_last=0)
    engine.destroy()

exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
