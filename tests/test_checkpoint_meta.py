"""medgpt.json: the typed checkpoint meta reads what earlier medgpt versions wrote."""
import json

import pytest
import transformers

from conftest import TINY_MODEL
from medgpt.checkpoint import CheckpointMeta, check_continuable, check_same_model
from medgpt.config import Config
from medgpt.errors import UserError


def test_checkpoint_meta_of_earlier_medgpt_still_reads_and_compares(tmp_path):
    """medgpt.json as earlier versions wrote it: six raw GPT2Config fields as the shape (n_inner None:
    4 * n_embd), no optimizer wrapper, a train state without the --select_best fields."""
    config = transformers.GPT2Config.from_json_file(TINY_MODEL)
    earlier = {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
    assert earlier["n_inner"] is None
    saved = {"config": {"train": {"precision": "fp32", "retired_field": 1}}, "model_config": config.to_dict(),
             "model_shape": earlier, "global_batch": 8, "zero_stage": 2, "world_size": 2,
             "train_state": {"step": 4, "epoch": 0, "consumed": 32}}
    meta = CheckpointMeta.from_dict(saved)
    assert (meta.optimizer, meta.train_state.step, meta.train_state.best_step) == ("", 4, 0)
    assert meta.config.train.precision == "fp32" and meta.config.data == Config().data  # missing: defaults
    check_same_model(meta, config, tmp_path)  # the same model: no error
    check_same_model(CheckpointMeta.from_dict(json.loads(json.dumps(meta.to_dict()))), config, tmp_path)
    with pytest.raises(UserError, match=r"another model shape \(n_embd: checkpoint 64 vs model 128\)"):
        check_same_model(meta, transformers.GPT2Config(**{**config.to_dict(), "n_embd": 128}), tmp_path)


def test_a_zero0_bf16_checkpoint_of_the_fp16_wrapper_is_refused_with_a_way_out(tmp_path):
    """Earlier medgpt trained bf16 at ZeRO-0 inside DeepSpeed's FP16_UnfusedOptimizer; ZeRO-0 bf16 is
    autocast with a plain AdamW now, which cannot take that optimizer state."""
    config = transformers.GPT2Config.from_json_file(TINY_MODEL)
    saved = {"config": {"train": {"precision": "bf16"}}, "model_config": config.to_dict(),
             "model_shape": {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer",
                                                             "n_head", "n_inner")},
             "global_batch": 8, "zero_stage": 0, "world_size": 1,
             "optimizer": "FP16_UnfusedOptimizer", "train_state": {"step": 4}}
    with pytest.raises(UserError, match=r"trained at ZeRO-0 in bf16 inside DeepSpeed's FP16_UnfusedOptimizer, .* "
                                        r"Export it \(python launcher/export.py --checkpoint"):
        check_continuable(CheckpointMeta.from_dict(saved), tmp_path)
    for stage, optimizer in ((0, "AdamW"), (1, "BF16_Optimizer")):
        check_continuable(CheckpointMeta.from_dict({**saved, "zero_stage": stage, "optimizer": optimizer}), tmp_path)
