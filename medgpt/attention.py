"""The attention medgpt's models run: transformers' SDPA, given its mask by medgpt's collate.

Registered with transformers as ``ATTENTION`` (``AttentionInterface``, modeling_utils.py) and
chosen when the model is built (medgpt/model.py). A name with no entry in transformers' mask
registry makes ``create_causal_mask`` return no mask at once (masking_utils.py,
``_preprocess_mask_arguments``: "custom attention without equivalent mask creation"). That is the
point. With the built-in "sdpa", GPT-2 passes position ids to the mask builder on every forward.
The builder looks for packed samples in them and tests its device result in a Python ``if``
(``find_packed_sequence_indices``): a host read of the device per micro-batch, even for rows that
hold one sample.

So each batch says what it needs, computed on the host by the collate functions:
- right-padded rows of one sample each carry no mask: SDPA runs ``is_causal`` (FlashAttention on a
  GPU). A real token never sees a pad under the causal mask, and pads carry no loss, so loss and
  gradients equal the padding-masked ones (tests/test_packing.py);
- packed rows carry ``document_mask``, [rows, 1, width, width] booleans, true where a query may
  attend to a key: earlier-or-same position within the same sample. SDPA takes it as its mask.
  Computed from the position ids, which restart at 0 at each sample.

Every forward of the training engine's model goes through here, evaluation and in-run scoring
included: those batches are right-padded single samples (medgpt/data.py, collate), so their 2-D
padding mask, dropped by the mask builder, changes nothing either. A left-padded batch would need
it: the exported model is saved without this choice and loads with transformers' default.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "medgpt_sdpa"
DOCUMENT_MASK = "document_mask"


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, 1, width, width]: query i may attend to key j when j <= i in the same sample; a sample
    starts wherever the position ids restart at 0."""
    sample = (position_ids == 0).cumsum(dim=1)
    same = sample[:, :, None] == sample[:, None, :]
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same & causal)[:, None]


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    # attention_mask is always None here (no mask function is registered under ATTENTION); a
    # packed batch's own mask arrives with the model's keyword arguments, which transformers
    # passes down to the attention function.
    return sdpa_attention_forward(module, query, key, value, kwargs.pop(DOCUMENT_MASK, None), **kwargs)


AttentionInterface.register(ATTENTION, _attention)
