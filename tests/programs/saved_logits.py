"""Load a save_pretrained folder with stock transformers and save its logits on a fixed batch.

    saved_logits.py <model folder> <output .pt>
"""
import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.arange(100, 164).reshape(2, 32)).logits
peft_found = importlib.util.find_spec("peft") is not None
torch.save({"logits": logits, "class": type(model).__name__, "peft_found": peft_found}, sys.argv[2])
