"""Tokenize (and, with --packing on, pack) the training data once, ahead of training.

    python launcher/prepare_data.py --config configs/smoke.yaml --packing on

Takes the same config file and flags as launcher/train.py; only the model and data ones below
matter (the others are accepted and ignored, so one command line serves both). A training run
with the same ones reuses the cache without tokenizing again.
"""
import sys

from medgpt.config import build_parser, parse_config
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return build_parser(__doc__, shown=("model", "data"))


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, parser())
    quiet_libraries(cfg.train.verbose)
    from medgpt.prepare_data import prepare_data  # imports torch (seconds): bad flags are reported before it

    prepare_data(cfg)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
