"""Next-token cross-entropy over the positions that carry a label.

Only answer tokens carry loss, so the LM head (a [tokens x 50,257] matmul, most of a small
model's step) is computed only at positions whose next token is labelled: transformers'
``logits_to_keep`` takes those positions. The loss and gradients equal the full computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medgpt.prompt import IGNORE_INDEX


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss once labels are shifted for next-token prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def label_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed (not averaged) loss of a batch, so the caller can normalise by the global count."""
    labels = batch["labels"]
    # Positions p predicting a labelled token p+1 in any row (rows share one index list).
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
