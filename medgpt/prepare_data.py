"""Build the training data cache ahead of training, in one process: on a login node with
internet, for compute nodes without. A later run with the same data flags only reads it."""
from __future__ import annotations

from medgpt.config import Config
from medgpt.data import padding_fraction, training_data
from medgpt.distributed import Dist
from medgpt.model import load_tokenizer
from medgpt.pubmedqa import load_records, official_split


def prepare_data(cfg: Config) -> None:
    records = load_records(cfg.data.data)
    split = official_split(records, cfg.data.fold)
    tokenizer = load_tokenizer(cfg.model)
    data = training_data(records, split, tokenizer, cfg.data, Dist.single())
    print(f"medgpt: {'reused' if data.reused else 'built'} training data cache {data.cache}")
    print(f"medgpt: {len(records)} questions tokenized, {len(split.train)} for training (fold {cfg.data.fold}), "
          f"seq_len {cfg.data.seq_len}")
    if cfg.data.packing:
        print(f"medgpt: {len(data.train)} packed rows, padding {padding_fraction(data.train, cfg.data.seq_len):.1%}")
