"""The training loss: the LM head only where labels are, and no attention mask for right-padded rows
(medgpt/loss.py), give the loss and gradients of the full head with the mask."""
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY_MODEL
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.prompt import IGNORE_INDEX


def test_the_training_loss_equals_the_full_head_with_the_attention_mask():
    torch.manual_seed(0)
    config = GPT2Config.from_json_file(str(TINY_MODEL))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # two forwards, same masks
    # float64: the two heads sum in another order; float32 rounding of that differs per CPU.
    model = GPT2LMHeadModel(config).double()
    input_ids = torch.randint(0, 50000, (3, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0  # a right-padded row
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 20:23] = input_ids[0, 20:23]
    labels[1, 28:30] = input_ids[1, 28:30]
    labels[2, 39] = input_ids[2, 39]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    fast = label_loss_sum(model, batch)  # sees no attention_mask: the batch's is for scoring
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    full.backward()
    assert count_label_tokens(labels) == 6
    torch.testing.assert_close(fast, full)  # float64 tolerances (1e-7): ~1e6 x its rounding
    for fast_grad, p in zip(fast_grads, model.parameters(), strict=True):
        torch.testing.assert_close(fast_grad, p.grad)
