"""Train GPT-2 on PubMedQA with DeepSpeed.

    deepspeed launcher/train.py --ds_config ds_configs/zero2.json --config configs/smoke.yaml
    torchrun --nproc_per_node 2 launcher/train.py --config configs/smoke.yaml
"""
import sys

from medgpt.config import parse_config
from medgpt.errors import run_cli
from medgpt.train import train

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(sys.argv[1:])))
