"""Linear warmup then cosine decay, used when the DeepSpeed JSON names no scheduler.

DeepSpeed's own WarmupCosineLR refuses warmup_num_steps=0 and runs its first two steps at
lr 0; this one runs step 1 at lr/warmup_steps (or the full lr without warmup).
"""
from __future__ import annotations

import functools
import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step with index ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                               min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
