"""Next-token cross-entropy over the positions that carry a label.

Only answer tokens carry loss, so the LM head (a [tokens x 50,257] matmul, most of a small
model's step) is computed only at positions whose next token is labelled: transformers'
``logits_to_keep`` takes those positions. The loss and gradients equal the full computation.

In a packed row no position predicts across a sample boundary: a sample's first token is a
prompt token, never labelled, so the last token of the sample before it carries no loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medgpt.attention import DOCUMENT_MASK
from medgpt.prompt import IGNORE_INDEX

# What the model gets of a batch: input_ids, and for packed samples their position ids and the mask
# that keeps each sample to itself (medgpt/attention.py). Never a padding mask: rows are
# right-padded, so under the causal mask no real token sees a pad, and pads carry no loss. Loss
# and gradients equal the padding-masked ones (tested).
MODEL_INPUTS = ("input_ids", "position_ids", DOCUMENT_MASK)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss once labels are shifted for next-token prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p predicting a labelled token p+1 in any row (rows share one index list).
    The collate functions compute them on the host: on a GPU, ``nonzero`` would wait for the device."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def label_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed (not averaged) loss of a batch, so the caller can normalise by the global count."""
    labels = batch["labels"]
    keep = batch["logit_positions"] if "logit_positions" in batch else logit_positions(labels)
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    # use_cache=False: a training forward keeps no keys and values for later tokens.
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, keep + 1]
    # bf16/fp16 logits are raised to fp32 for the softmax; fp64 ones (the tests' references) stay fp64.
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
