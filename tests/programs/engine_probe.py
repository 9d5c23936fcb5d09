"""Test helper: build a DeepSpeed engine the way training does and print, as one JSON line
(rank 0), what DeepSpeed made of medgpt's config and what one training step costs.

    engine_probe.py <ds_config.json> <precision> <model .json>

- ``optimizer``: the class DeepSpeed built from the JSON's optimizer section, and ``wrapper``: the
  one it put around it (ZeRO, BF16_Optimizer, FP16_*Optimizer);
- ``accumulates_in``: the dtype of the buffer gradients are summed in after two micro-steps;
- ``loss_scale``: read the way the training loop reads it (null if there is none);
- ``collectives_per_step``: torch.distributed calls made by medgpt's own code in each of 3
  ``train_step`` calls (DeepSpeed's own are not counted);
- ``forward_dtype``: the dtype of the logits of a forward through the engine.
"""
import collections
import json
import sys

import deepspeed
import torch
import torch.distributed as torch_dist

from medgpt.config import Config, ModelConfig
from medgpt.data import collate
from medgpt.distributed import init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.model import build_model, load_model_config
from medgpt.shutdown import exit_process
from medgpt.train import train_step

ds_path, precision, model_path = sys.argv[1:4]
dist = init_distributed("cpu")
cfg = Config()
cfg.model = ModelConfig(model=model_path, dropout=0.0)
cfg.train.precision, cfg.train.micro_batch_size, cfg.train.grad_accum = precision, 2, 2
model_config = load_model_config(cfg.model)
ds_config = resolve_ds_config(load_ds_config(ds_path), cfg, dist.world_size, total_steps=4,
                              hidden_size=model_config.n_embd, on_gpu=False)
model, hf_deepspeed_config = build_model(cfg.model, model_config, ds_config, seed=0)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)


def micro_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, model_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed)).tolist()
    return collate([{"input_ids": row, "labels": [-100] * 20 + row[20:]} for row in ids], pad_id=0)


# Two micro-steps by hand: after the second backward the accumulated gradient is complete.
for i in range(2):
    batch = micro_batch(i)
    engine.backward(engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)
    if i == 0:
        engine.step()
optimizer = engine.optimizer
if hasattr(optimizer, "fp32_groups_gradients_flat"):  # BF16_Optimizer (ZeRO-1)
    buffer = optimizer.fp32_groups_gradients_flat[0]
elif hasattr(optimizer, "averaged_gradients"):  # the ZeRO optimizers: each rank's partition (none offloaded)
    grads = optimizer.averaged_gradients
    buffer = next(iter(grads.values() if isinstance(grads, dict) else grads), None)
    buffer = buffer[0] if isinstance(buffer, list) else buffer
else:  # ZeRO-0: the parameters' own .grad
    buffer = next(p.grad for p in engine.module.parameters() if p.grad is not None)
accumulates_in = None if buffer is None else str(buffer.dtype).removeprefix("torch.")
engine.step()

# Count medgpt's collectives: wrap torch.distributed's functions, attribute each call to the module
# that made it.
counts: collections.Counter = collections.Counter()
for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter"):
    real = getattr(torch_dist, name)

    def counting(*args, _real=real, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("medgpt"):
            counts["step"] += 1
        return _real(*args, **kwargs)
    setattr(torch_dist, name, counting)
per_step = []
for step in range(3):
    counts.clear()
    train_step(engine, [micro_batch(10 * step + i) for i in range(2)], dist, stop_requested=False,
               grad_clip=cfg.optim.grad_clip)
    per_step.append(counts["step"])

loss_scale = getattr(optimizer, "loss_scale", None)
with torch.no_grad():
    forward_dtype = str(engine(input_ids=micro_batch(0)["input_ids"]).logits.dtype).removeprefix("torch.")
if dist.is_main:
    print(json.dumps({"optimizer": type(engine.basic_optimizer).__name__, "wrapper": type(optimizer).__name__,
                      "accumulates_in": accumulates_in, "collectives_per_step": per_step,
                      "loss_scale": None if loss_scale is None else float(loss_scale),
                      "forward_dtype": forward_dtype}), flush=True)

exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
