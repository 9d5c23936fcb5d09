"""Tokenize (and, with --packing on, pack) the training data once, ahead of training.

    python launcher/prepare_data.py --config configs/smoke.yaml --packing on

Takes the same config and flags as launcher/train.py (only the model/tokenizer and data ones
matter); a training run with the same ones reuses the cache without tokenizing again.
"""
import sys

from medgpt.config import parse_config
from medgpt.errors import run_cli
from medgpt.prepare_data import prepare_data

if __name__ == "__main__":
    run_cli(lambda: prepare_data(parse_config(sys.argv[1:])))
