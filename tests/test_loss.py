"""The training loss: the LM head only where labels are, and no attention mask for right-padded rows
(medgpt/loss.py, medgpt/attention.py), give the loss and gradients of the full head with the mask;
and it compiles without a graph break."""
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY_MODEL
from medgpt.attention import ATTENTION
from medgpt.data import HOST_ONLY, collate, collate_packs
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.prompt import IGNORE_INDEX


def test_the_training_loss_equals_the_full_head_with_the_attention_mask():
    torch.manual_seed(0)
    config = GPT2Config.from_json_file(str(TINY_MODEL))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # two forwards, same masks
    # float64: the two heads sum in another order; float32 rounding of that differs per CPU.
    reference = GPT2LMHeadModel(config).double()  # transformers' attention, given the padding mask
    config._attn_implementation = ATTENTION  # the training model's (medgpt.model.build_model)
    model = GPT2LMHeadModel(config).double()
    model.load_state_dict(reference.state_dict())
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

    logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    full.backward()
    assert count_label_tokens(labels) == 6
    torch.testing.assert_close(fast, full)  # float64 tolerances (1e-7): ~1e6 x its rounding
    for fast_grad, p in zip(fast_grads, reference.parameters(), strict=True):
        torch.testing.assert_close(fast_grad, p.grad)


def test_the_forward_and_loss_compile_to_one_graph():
    """--compile (medgpt/compilation.py): the training forward and loss trace as one graph with no
    break, right-padded rows and packed ones (their document mask included). A break splits the
    compiled step and runs Python between the parts; a mask built from device values would be one."""
    config = GPT2Config.from_json_file(str(TINY_MODEL))
    config._attn_implementation = ATTENTION
    model = GPT2LMHeadModel(config)
    prompt, answer = list(range(1, 37)), [40, 41, 42]
    rows = [{"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * 36 + answer},
            {"input_ids": prompt[:20] + answer, "labels": [IGNORE_INDEX] * 20 + answer}]
    packs = [{"input_ids": rows[0]["input_ids"] + rows[1]["input_ids"], "labels": rows[0]["labels"] + rows[1]["labels"],
              "sample_lengths": [39, 23]}] * 2
    for batch in (collate(rows, pad_id=0, width=64), collate_packs(packs, pad_id=0, width=64)):
        on_device = {k: v for k, v in batch.items() if k not in HOST_ONLY}
        explained = torch._dynamo.explain(lambda b: label_loss_sum(model, b))(on_device)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        assert batch["input_ids"].shape == (2, 64)  # --compile's rows: one width
