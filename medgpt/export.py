"""A checkpoint of any ZeRO stage -> a Hugging Face model folder that loads on one device.

The fp32 weights come from DeepSpeed's own consolidation (``zero_to_fp32``) for ZeRO 1-3, or
for ZeRO-0 from the module state (fp32 runs) or the optimizer's fp32 master copy (bf16/fp16). The
model is built on the meta device and the weights are assigned, not copied, so peak host memory
stays about one fp32 copy.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from medgpt.checkpoint import ds_to_universal, read_finished, read_meta, resolve_checkpoint
from medgpt.console import library_prints
from medgpt.errors import UserError
from medgpt.model import TORCH_DTYPES
from medgpt.model_card import CONFIG_KEY, export_facts, write_model_card
from medgpt.outputs import check_new_output_dir
from medgpt.safe_load import check_checkpoint_files, load_weights

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0's full module state
TEST_METRICS = "test_metrics.json"  # a run's test scores in its output_dir (train.py, scoring.write_results)


def fp32_state_dict(tag_dir: Path, config: GPT2Config) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, consolidated by DeepSpeed."""
    meta = read_meta(tag_dir)
    if meta.zero_stage > 0:
        # DeepSpeed's readers load with weights_only=False: every file is checked first (medgpt/safe_load.py).
        check_checkpoint_files(tag_dir)
        if meta.optimizer == "BF16_Optimizer":
            return _universal_fp32(tag_dir)
        with library_prints():
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # ZeRO-0: DeepSpeed saved the full module state, with the optimizer's in the same file.
    states = load_weights(tag_dir / MODEL_STATES)
    if meta.config.train.precision == "fp32":
        return {k: v.float() for k, v in states["module"].items()}
    return _zero0_fp32_masters(states["optimizer"], config)


def _universal_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A BF16_Optimizer checkpoint (ZeRO-1 in bf16 with fp32 gradient accumulation): its state has
    no zero_stage (runtime/bf16_optimizer.py:629), which zero_to_fp32 requires (utils/zero_to_fp32.py
    :210), so it goes through DeepSpeed's universal format, one fp32 tensor per parameter."""
    with tempfile.TemporaryDirectory() as scratch:
        universal = Path(scratch) / "universal"
        ds_to_universal(tag_dir, universal)
        return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"]
                for p in (universal / "zero").iterdir() if (p / "fp32.pt").is_file()}


def _zero0_fp32_masters(optimizer_state: dict[str, Any], config: GPT2Config) -> dict[str, torch.Tensor]:
    """bf16/fp16 at ZeRO-0: the module holds the 16-bit copy; the fp32 master weights are the
    optimizer wrapper's, in the order of model.parameters() (one group: medgpt hands DeepSpeed
    model.parameters()). FP16_UnfusedOptimizer keeps one tensor per parameter
    (runtime/fp16/unfused_optimizer.py:355 'fp32_groups'), FP16_Optimizer one flat tensor per
    group (runtime/fp16/fused_optimizer.py:471 'fp32_groups_flat')."""
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in GPT2LMHeadModel(config).named_parameters()]
    if "fp32_groups" in optimizer_state:
        masters = [t for group in optimizer_state["fp32_groups"] for t in group]
    else:
        flat = torch.cat([g.flatten() for g in optimizer_state["fp32_groups_flat"]])
        masters = list(flat.split([shape.numel() for _, shape in shapes]))
    if len(masters) != len(shapes):
        raise UserError(f"the checkpoint's optimizer holds {len(masters)} fp32 tensors for the model's "
                        f"{len(shapes)} parameters; it was not written by this model")
    return {name: t.reshape(shape).float() for (name, shape), t in zip(shapes, masters, strict=True)}


def run_test_metrics(tag_dir: Path) -> dict[str, Any] | None:
    """The test scores of a checkpoint's weights: its run's test_metrics.json, if the run scored the
    test set with this checkpoint (recorded in it: medgpt.checkpoint.mark_finished)."""
    scores = tag_dir.parent.parent / TEST_METRICS  # <output_dir>/checkpoints/step<N>
    if "test" not in read_finished(tag_dir) or not scores.is_file():
        return None
    return json.loads(scores.read_text())


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "fp32") -> Path:
    if dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype '{dtype}' is unknown; use one of {', '.join(TORCH_DTYPES)}")
    tag_dir = resolve_checkpoint(checkpoint, "--checkpoint")  # verified against its manifest
    output = Path(output)
    check_new_output_dir(output, "export folder")
    meta = read_meta(tag_dir)
    config = GPT2Config.from_dict(meta.model_config)
    setattr(config, CONFIG_KEY, export_facts(meta))  # seq_len, prompt format, ... (medgpt/model_card.py)
    state = fp32_state_dict(tag_dir, config)
    # The plain constructor, not from_config: inside a ZeRO-3 run (a live HfDeepSpeedConfig)
    # from_config would build under zero.Init, a collective that rank 0 alone would hang in.
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # lm_head.weight is wte.weight (tied); DeepSpeed stores the shared tensor once.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UserError(f"checkpoint '{tag_dir}' does not match its model config "
                        f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    model.to(TORCH_DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.eos_token_id)
    model.save_pretrained(str(output), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tag_dir / "tokenizer")).save_pretrained(str(output))
    write_model_card(output, meta, tag_dir, run_test_metrics(tag_dir))
    return output
