"""A checkpoint of any ZeRO stage -> a Hugging Face model folder that loads on one device.

The fp32 weights come from DeepSpeed's own consolidation (``zero_to_fp32``) for ZeRO 1-3, or
for ZeRO-0 from the module state (fp32 runs) or the optimizer's fp32 master copy (bf16/fp16). The
model is built on the meta device and the weights are assigned, not copied, so peak host memory
stays about one fp32 copy.

A LoRA run (medgpt/lora.py) exports the same plain GPT-2 folder, its adapters merged into the
weights in fp32 (it loads in transformers without peft), plus the adapter alone in peft's format in
``<export>/adapter/`` (a subfolder: an adapter_config.json at the top would make transformers, with
peft installed, load the folder as an adapter).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from medgpt.checkpoint import HALF_PRECISION_WRAPPERS, ds_to_universal, read_finished, read_meta, resolve_checkpoint
from medgpt.config import ModelConfig
from medgpt.console import library_prints
from medgpt.errors import UserError
from medgpt.lora import ADAPTER_DIR
from medgpt.model import TORCH_DTYPES
from medgpt.model_card import CONFIG_KEY, export_facts, write_model_card
from medgpt.outputs import check_new_output_dir
from medgpt.safe_load import check_checkpoint_files, load_weights

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0's full module state
TEST_METRICS = "test_metrics.json"  # a run's test scores in its output_dir (train.py, scoring.write_results)


def training_module(config: GPT2Config, model_cfg: ModelConfig) -> torch.nn.Module:
    """The module a run trained, on the meta device: GPT-2, or its peft model with adapters."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
        if not model_cfg.lora_r:
            return model
        from medgpt.lora import add_adapters  # imports peft, an optional extra

        return add_adapters(model, model_cfg)


def fp32_state_dict(tag_dir: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint of ``module`` (training_module), consolidated by DeepSpeed."""
    meta = read_meta(tag_dir)
    if meta.zero_stage > 0:
        # DeepSpeed's readers load with weights_only=False: every file is checked first (medgpt/safe_load.py).
        check_checkpoint_files(tag_dir)
        if meta.optimizer == "BF16_Optimizer":
            state = _universal_fp32(tag_dir)
        else:
            with library_prints():
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return _with_frozen(state, tag_dir, module)
    # ZeRO-0: DeepSpeed saved the full module state, with the optimizer's in the same file. The module
    # holds the fp32 weights (in bf16 too: autocast, medgpt.ds_config) unless the optimizer was one of
    # DeepSpeed's 16-bit wrappers, as in checkpoints written before medgpt trained bf16 that way (and,
    # from before the wrapper was recorded, any half-precision one).
    states = load_weights(tag_dir / MODEL_STATES)
    wrapped = meta.optimizer in HALF_PRECISION_WRAPPERS or (
        not meta.optimizer and meta.config.train.precision != "fp32")
    if not wrapped:
        return {k: v.float() for k, v in states["module"].items()}
    masters = _zero0_fp32_masters(states["optimizer"], module)
    # Frozen (LoRA base) parameters have no master: the module's copy is all there is.
    return {**{k: v.float() for k, v in states["module"].items() if k not in masters}, **masters}


def _with_frozen(state: dict[str, torch.Tensor], tag_dir: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Add the frozen parameters DeepSpeed's consolidation leaves out. It reads them from the
    checkpoint's frozen-parameter fragments, which DeepSpeed writes only where it partitions
    gradients, ZeRO >= 2 (runtime/engine.py:5383); at ZeRO-1 (and through the universal format)
    they are in the module state that ZeRO 0-2 write whole (in the precision trained with: the
    copy the adapters were trained against)."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad} - state.keys()
    if not frozen or not (tag_dir / MODEL_STATES).is_file():
        return state
    module_state = load_weights(tag_dir / MODEL_STATES)["module"]
    return {**state, **{name: module_state[name].float() for name in frozen if name in module_state}}


def _universal_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A BF16_Optimizer checkpoint (ZeRO-1 in bf16 with fp32 gradient accumulation): its state has
    no zero_stage (runtime/bf16_optimizer.py:629), which zero_to_fp32 requires (utils/zero_to_fp32.py
    :210), so it goes through DeepSpeed's universal format, one fp32 tensor per parameter."""
    with tempfile.TemporaryDirectory() as scratch:
        universal = Path(scratch) / "universal"
        ds_to_universal(tag_dir, universal)
        return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"]
                for p in (universal / "zero").iterdir() if (p / "fp32.pt").is_file()}


def _zero0_fp32_masters(optimizer_state: dict[str, Any], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """bf16/fp16 at ZeRO-0: the module holds the 16-bit copy; the fp32 master weights are the
    optimizer wrapper's, in the order of the trainable parameters (one group: medgpt hands DeepSpeed
    medgpt.lora.trainable_parameters). FP16_UnfusedOptimizer keeps one tensor per parameter
    (runtime/fp16/unfused_optimizer.py:355 'fp32_groups'), FP16_Optimizer one flat tensor per
    group (runtime/fp16/fused_optimizer.py:471 'fp32_groups_flat')."""
    shapes = [(name, p.shape) for name, p in module.named_parameters() if p.requires_grad]
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
    config, model_cfg = GPT2Config.from_dict(meta.model_config), meta.config.model
    setattr(config, CONFIG_KEY, export_facts(meta))  # seq_len, prompt format, ... (medgpt/model_card.py)
    # The plain constructor, not from_config: inside a ZeRO-3 run (a live HfDeepSpeedConfig)
    # from_config would build under zero.Init, a collective that rank 0 alone would hang in.
    module = training_module(config, model_cfg)
    missing, unexpected = module.load_state_dict(fp32_state_dict(tag_dir, module), strict=False, assign=True)
    # lm_head.weight is wte.weight (tied); DeepSpeed stores the shared tensor once.
    if unexpected or {name for name in missing if not name.endswith("lm_head.weight")}:
        raise UserError(f"checkpoint '{tag_dir}' does not match its model config "
                        f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    if model_cfg.lora_r:  # the adapter alone (fp32), then merged into the weights in fp32
        module.get_base_model().tie_weights()
        module.save_pretrained(str(output / ADAPTER_DIR))
        module = module.merge_and_unload()
    else:
        module.tie_weights()
    model = module.to(TORCH_DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.eos_token_id)
    model.save_pretrained(str(output), safe_serialization=True)
    # The checkpoint holds the tokenizer's own save_pretrained files: copied as they are (loading
    # and saving them again costs ~1 s of transformers' tokenizer set-up and changes nothing).
    for file in sorted((tag_dir / "tokenizer").iterdir()):
        shutil.copy2(file, output / file.name)
    write_model_card(output, meta, tag_dir, run_test_metrics(tag_dir))
    return output
