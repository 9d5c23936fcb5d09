"""Test helper, run under torchrun: load each checkpoint into a DeepSpeed engine the way training
does and save the engine's logits on a fixed batch (rank 0).

    engine_logits.py <tag dir> <output .pt> [<tag dir> <output .pt> ...]
"""
import sys
from pathlib import Path

import deepspeed
import torch

from medgpt.checkpoint import load_checkpoint, read_meta
from medgpt.distributed import init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.model import build_model, load_model_config
from medgpt.shutdown import exit_process

dist = init_distributed()
for tag_dir, out in zip(map(Path, sys.argv[1::2]), map(Path, sys.argv[2::2]), strict=True):
    meta = read_meta(tag_dir)
    cfg = meta.config
    model_config = load_model_config(cfg.model)
    ds = resolve_ds_config(load_ds_config(cfg.train.ds_config), cfg, dist.world_size, 8, model_config.n_embd, False)
    model, _hf = build_model(cfg.model, model_config, ds, seed=0)  # another init: the checkpoint must overwrite it
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    load_checkpoint(engine, tag_dir, dist)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=torch.arange(100, 164).reshape(2, 32)).logits
    if dist.is_main:
        torch.save(logits, out)

exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
