"""LoRA through peft: low-rank adapters on GPT-2's Conv1D projections, the model itself frozen.

peft is an optional extra (``pip install 'medgpt[lora]'``): it is imported only when an adapter
is asked for, so full fine-tuning runs without it (``Config.problems`` reports a missing peft at start).

Under ZeRO-3 a pretrained model is already partitioned when the adapters are added (it loads inside
zero.Init): peft reads a partitioned Conv1D's shape from ``weight.ds_shape`` (peft/tuners/
tuners_utils.py:193-196), and the adapters it creates are ordinary parameters that
``deepspeed.initialize`` partitions with the rest (runtime/zero/parameter_offload.py:258-263 converts
the parameters that are not yet ZeRO ones). DeepSpeed is handed only the trainable parameters, so its
optimizer holds fp32 masters and Adam moments for the adapters alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medgpt.config import ModelConfig
from medgpt.errors import UserError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from medgpt.checkpoint import CheckpointMeta

ADAPTER_DIR = "adapter"  # inside an export folder: the adapter alone, in peft's format
# What a resumed run must share with its checkpoint: the adapters' shapes and the scale they were trained at.
SAME_ON_RESUME = ("lora_r", "lora_alpha", "lora_targets")


def lora_config(cfg: ModelConfig) -> LoraConfig:
    from peft import LoraConfig

    # fan_in_fan_out: GPT-2's Conv1D stores its weight as (in, out), transposed against nn.Linear
    # (peft would set it itself, with a warning: peft/tuners/lora/layer.py:2758-2763).
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_modules, fan_in_fan_out=True, bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=cfg.model)


def add_adapters(model: torch.nn.Module, cfg: ModelConfig) -> PeftModel:
    """The model with adapters (drawn from the global torch RNG: the same on every rank and on
    resume for the same seed) and every other parameter frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What DeepSpeed's optimizer gets: all parameters for full fine-tuning, the adapters with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def check_same_lora(meta: CheckpointMeta, cfg: ModelConfig, tag_dir: Path) -> None:
    """Refuse to resume a checkpoint with other adapters (or none where it has some): its weights
    and optimizer states would not fit, or would be trained at another scale."""
    saved = meta.config.model  # a checkpoint from before LoRA: lora_r 0, full fine-tuning
    if saved.lora_r == cfg.lora_r == 0:
        return
    diffs = [f"{name}: checkpoint {getattr(saved, name)} vs run {getattr(cfg, name)}"
             for name in SAME_ON_RESUME if getattr(saved, name) != getattr(cfg, name)]
    if diffs:
        raise UserError(f"checkpoint '{tag_dir}' was trained with other LoRA settings ({'; '.join(diffs)}); "
                        "resume with its settings, or start fresh in another --output_dir")
