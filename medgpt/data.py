"""From records to batches: tokenize once into an on-disk cache, shard with DistributedSampler,
pad per batch."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from medgpt.config import DataConfig
from medgpt.distributed import Dist
from medgpt.prompt import IGNORE_INDEX, answer_text, context_text, encode_pieces, question_text
from medgpt.pubmedqa import Record

# Bump when the prompt format or the tokenization changes: it invalidates cached datasets.
PROMPT_FORMAT_VERSION = 1


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "medgpt"


def cache_key(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    """Everything the tokenized data depends on, and nothing else."""
    vocab = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else sorted(tokenizer.get_vocab().items())
    return Hasher.hash([PROMPT_FORMAT_VERSION, [dataclasses.astuple(r) for r in records], vocab,
                        tokenizer.eos_token_id, cfg.seq_len, cfg.long_answer])


def _tokenize(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> datasets.Dataset:
    # Pieces are tokenized in batches (fast), then joined and truncated per record.
    contexts = tokenizer([context_text(r.contexts) for r in records])["input_ids"]
    questions = tokenizer([question_text(r.question) for r in records])["input_ids"]
    answers = tokenizer([answer_text(r.final_decision, r.long_answer if cfg.long_answer else "")
                         for r in records])["input_ids"]
    rows: dict[str, list[Any]] = {"pubid": [], "input_ids": [], "labels": []}
    for r, c, q, a in zip(records, contexts, questions, answers):
        enc = encode_pieces(c, q, a, tokenizer.eos_token_id, cfg.seq_len)
        rows["pubid"].append(r.pubid)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
    return datasets.Dataset.from_dict(rows)


def tokenized_dataset(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                      dist: Dist) -> datasets.Dataset:
    """All records tokenized, in record order. Built once per machine (local rank 0 writes the
    cache; the others wait and memory-map it), then reused by every later run."""
    path = _cache_root(cfg) / f"pubmedqa-{cache_key(records, tokenizer, cfg)}"
    if dist.local_rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        _tokenize(records, tokenizer, cfg).save_to_disk(str(staging))
        try:  # atomic publish: a reader never sees half a cache, a racing builder loses quietly
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    return datasets.load_from_disk(str(path))


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through.

    Rank r takes every world_size-th index of one seeded permutation, so the first k*world_size
    positions of the permutation are consumed after k samples per rank whatever the world size:
    ``set_epoch(epoch, consumed)`` skips the ``consumed`` global samples already trained on.
    """

    def __init__(self, dataset: Any, dist: Dist, seed: int) -> None:
        super().__init__(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        if consumed % self.num_replicas:
            raise ValueError(f"consumed={consumed} is not a multiple of world size {self.num_replicas}")
        self.consumed = consumed

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.consumed // self.num_replicas:])

    def __len__(self) -> int:
        return self.num_samples - self.consumed // self.num_replicas


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch; padding carries no loss and no attention.
    ``sample_lengths`` holds each row's real token count (throughput counts no padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "sample_lengths": attention_mask.sum(dim=1)}


def train_loader(dataset: datasets.Dataset, sampler: ResumableDistributedSampler, micro_batch_size: int,
                 pad_id: int) -> DataLoader:
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True,
                      collate_fn=functools.partial(collate, pad_id=pad_id))


def shard_positions(num_rows: int, dist: Dist) -> list[int]:
    """The dataset positions :func:`eval_loader` gives this rank, in order; positions past the end
    (``>= num_rows``) are filler rows."""
    per_rank = math.ceil(num_rows / dist.world_size)
    return list(range(dist.rank, per_rank * dist.world_size, dist.world_size))


def eval_loader(dataset: datasets.Dataset, dist: Dist, batch_size: int, pad_id: int) -> DataLoader:
    """This rank's strided shard, in order. Every rank gets the same number of rows (ZeRO-3 needs
    all ranks in every forward): short shards are topped up with a row whose labels are all
    ignored, so it adds nothing to any sum."""
    rows = []
    for pos in shard_positions(len(dataset), dist):
        if pos < len(dataset):
            rows.append(dataset[pos])
        else:
            filler = dataset[0]
            rows.append({**filler, "labels": [IGNORE_INDEX] * len(filler["labels"])})
    return DataLoader(rows, batch_size=batch_size, shuffle=False, 
                      collate_fn=functools.partial(collate, pad_id=pad_id))
