"""medgpt: fine-tune GPT-2 on PubMedQA with DeepSpeed ZeRO."""
