"""Train GPT-2 on PubMedQA with DeepSpeed.

    deepspeed launcher/train.py --ds_config ds_configs/zero2.json --config configs/smoke.yaml
    torchrun --nproc_per_node 2 launcher/train.py --config configs/smoke.yaml
"""
import sys

from medgpt.config import parse_config
from medgpt.errors import run_cli


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    from medgpt.train import train  # imports DeepSpeed (seconds): bad flags are reported before it

    train(cfg)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
