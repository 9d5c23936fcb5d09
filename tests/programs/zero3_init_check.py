"""Build the model under DeepSpeed ZeRO-3 (zero.Init: partitioned as it is made) from a random init
and from pretrained weights, and check that each equals the plain build with the same seed;
prints ZERO3-INIT-EQUAL if so. Run from the repository root, as one process.

    zero3_init_check.py <model .json> <folder to save the plain model in>
"""
import sys
from typing import Any

import deepspeed
import torch

from medgpt.config import parse_config
from medgpt.distributed import init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.model import build_model, load_model_config
from medgpt.shutdown import exit_process


def gathered(engine: Any) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values()), "not partitioned"
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.data.clone() for k, v in params.items()}


init_distributed()
tiny, saved = sys.argv[1], sys.argv[2]
cfg = parse_config(["--model", tiny, "--precision", "fp32", "--max_steps", "1"])
ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 1, 1, 64, on_gpu=False)
plain, _ = build_model(cfg.model, load_model_config(cfg.model), {}, seed=123)
plain.save_pretrained(saved)
reference = {k: v.clone() for k, v in plain.state_dict().items()}

for source in (tiny, saved):  # random init, and pretrained weights loaded under zero.Init
    cfg.model.model = source
    model, _hf = build_model(cfg.model, load_model_config(cfg.model), ds, seed=123)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    for name, value in gathered(engine).items():
        assert torch.equal(value, reference[name]), (source, name)
print("ZERO3-INIT-EQUAL")

exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
