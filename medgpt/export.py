"""A checkpoint of any ZeRO stage -> a Hugging Face model folder that loads on one device.

The fp32 weights come from DeepSpeed's own consolidation (``zero_to_fp32``) for ZeRO 1-3, or
from the module state DeepSpeed saved for ZeRO-0. The model is built on the meta device and the
weights are assigned, not copied, so peak host memory stays about one fp32 copy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from medgpt.checkpoint import LATEST_FILE, META_FILE, read_meta
from medgpt.errors import UserError
from medgpt.outputs import check_new_output_dir
from medgpt.safe_load import check_checkpoint_files, load_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0's full module state


def resolve_tag_dir(checkpoint: str | Path) -> Path:
    """Accept a tag folder, a checkpoints folder (its ``latest``) or a run's output_dir."""
    path = Path(checkpoint)
    for root in (path, path / "checkpoints"):
        if (root / LATEST_FILE).is_file():
            path = root / (root / LATEST_FILE).read_text().strip()
            break
    if not (path / META_FILE).is_file():
        raise UserError(f"'{checkpoint}' is not a medgpt checkpoint (no {META_FILE}); pass "
                        "a run's output_dir, its checkpoints folder or one of its step<N> folders")
    return path


def fp32_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, consolidated by DeepSpeed."""
    if read_meta(tag_dir)["zero_stage"] > 0:
        check_checkpoint_files(tag_dir)  # zero_to_fp32 loads with weights_only=False (medgpt/safe_load.py)
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # ZeRO-0 (fp32): DeepSpeed saved the full module state with the engine's bookkeeping.
    states = load_weights(tag_dir / MODEL_STATES)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "fp32") -> Path:
    if dtype not in DTYPES:
        raise UserError(f"--dtype '{dtype}' is unknown; use one of {', '.join(DTYPES)}")
    tag_dir = resolve_tag_dir(checkpoint)
    output = Path(output)
    check_new_output_dir(output, "export folder")
    meta = read_meta(tag_dir)
    if meta["zero_stage"] == 0 and meta["config"]["train"]["precision"] != "fp32":
        raise UserError("exporting a ZeRO-0 checkpoint trained in bf16/fp16 is not supported: its fp32 master "
                        "weights live in the optimizer state; train with ZeRO >= 1 or fp32")
    config = GPT2Config.from_dict(meta["model_config"])
    state = fp32_state_dict(tag_dir)
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
    model.to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.eos_token_id)
    model.save_pretrained(str(output), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tag_dir / "tokenizer")).save_pretrained(str(output))
    return output
