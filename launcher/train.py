"""Train GPT-2 on PubMedQA with DeepSpeed. Every field of the YAML config is also a flag; flags win
over the file.

    deepspeed launcher/train.py --ds_config ds_configs/zero2.json --config configs/smoke.yaml
    torchrun --nproc_per_node 2 launcher/train.py --config configs/smoke.yaml
"""
import sys

from medgpt.config import build_parser, parse_config
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return build_parser(__doc__)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, parser())
    quiet_libraries(cfg.train.verbose)
    from medgpt.train import train  # imports DeepSpeed (seconds): bad flags are reported before it

    train(cfg)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
