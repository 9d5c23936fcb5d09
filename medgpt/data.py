"""From records to batches: tokenize once into an on-disk cache, optionally pack the training
samples into rows of seq_len tokens (cached too), shard with DistributedSampler, pad per batch."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from medgpt.config import DataConfig
from medgpt.distributed import Dist
from medgpt.loss import logit_positions
from medgpt.prompt import (
    IGNORE_INDEX,
    PROMPT_FORMAT_VERSION,
    answer_text,
    context_text,
    encode_pieces,
    question_text,
)
from medgpt.pubmedqa import Record, Split

# Bump when the packing algorithm changes: it invalidates cached packs.
PACKING_VERSION = 1


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
    for r, c, q, a in zip(records, contexts, questions, answers, strict=True):
        enc = encode_pieces(c, q, a, tokenizer.eos_token_id, cfg.seq_len)
        rows["pubid"].append(r.pubid)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
    return datasets.Dataset.from_dict(rows)


def _tokenized_path(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Path:
    return _cache_root(cfg) / f"pubmedqa-{cache_key(records, tokenizer, cfg)}"


def _build_once(path: Path, build: Callable[[], datasets.Dataset], dist: Dist) -> datasets.Dataset:
    """The dataset cached at ``path``, built first if missing: local rank 0 builds and publishes
    it, the other ranks wait and memory-map it."""
    if dist.local_rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        build().save_to_disk(str(staging))
        try:  # atomic publish: a reader never sees half a cache, a racing builder loses quietly
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    return datasets.load_from_disk(str(path))


def tokenized_dataset(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                      dist: Dist) -> datasets.Dataset:
    """All records tokenized, in record order. Built once per machine, then reused by every later run."""
    return _build_once(_tokenized_path(records, tokenizer, cfg), lambda: _tokenize(records, tokenizer, cfg), dist)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most ``capacity`` tokens: longest first, each into the
    first bin with room. Deterministic (ties keep index order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, free in enumerate(room) if free >= lengths[i]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _pack(tokens: datasets.Dataset, rows: list[int], seq_len: int) -> datasets.Dataset:
    samples = tokens.select(rows)
    ids, labels = samples["input_ids"], samples["labels"]
    packs: dict[str, list[Any]] = {"rows": [], "input_ids": [], "labels": [], "sample_lengths": []}
    for members in first_fit_decreasing([len(x) for x in ids], seq_len):
        packs["rows"].append([rows[i] for i in members])
        packs["input_ids"].append([t for i in members for t in ids[i]])
        packs["labels"].append([t for i in members for t in labels[i]])
        packs["sample_lengths"].append([len(ids[i]) for i in members])
    return datasets.Dataset.from_dict(packs)


def _packs_path(tokens_path: Path, rows: list[int], seq_len: int) -> Path:
    """Packs live next to the tokenized cache they come from, keyed by it, the rows packed,
    seq_len and the algorithm."""
    key = Hasher.hash([tokens_path.name, rows, seq_len, PACKING_VERSION])
    return tokens_path.with_name(f"{tokens_path.name}-packs-{key}")


def packed_dataset(tokens: datasets.Dataset, rows: list[int], seq_len: int, dist: Dist) -> datasets.Dataset:
    """The samples ``rows`` of ``tokens`` (the tokenized cache) packed into rows of at most
    ``seq_len`` tokens, built once and cached. Columns: ``rows`` (the samples' positions in
    ``tokens``), ``input_ids`` and ``labels`` (the samples' concatenated), ``sample_lengths``."""
    path = _packs_path(Path(tokens.cache_files[0]["filename"]).parent, rows, seq_len)
    return _build_once(path, lambda: _pack(tokens, rows, seq_len), dist)


def padding_fraction(packs: datasets.Dataset, seq_len: int) -> float:
    """Share of the packed rows' seq_len tokens that are padding."""
    return 1 - sum(sum(n) for n in packs["sample_lengths"]) / (len(packs) * seq_len)


@dataclass
class TrainingData:
    train: datasets.Dataset  # samples, or packs of up to seq_len tokens with packing on
    dev: datasets.Dataset  # always samples
    cache: Path  # the folder `train` is read from
    reused: bool  # everything was in the cache already: nothing was tokenized or packed


def training_data(records: list[Record], split: Split, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                  dist: Dist) -> TrainingData:
    """Train and dev sets from the cache, built first where missing (``launcher/prepare_data.py``
    builds them ahead). Packing covers the train split only; dev is scored per sample."""
    tokens_path = _tokenized_path(records, tokenizer, cfg)
    train_path = _packs_path(tokens_path, split.train, cfg.seq_len) if cfg.packing else tokens_path
    reused = tokens_path.exists() and train_path.exists()  # as local rank 0, the builder, sees it
    tokens = tokenized_dataset(records, tokenizer, cfg, dist)
    train = packed_dataset(tokens, split.train, cfg.seq_len, dist) if cfg.packing else tokens.select(split.train)
    return TrainingData(train=train, dev=tokens.select(split.dev), cache=train_path, reused=reused)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, and can group by length.

    Rank r takes every world_size-th index of one seeded per-epoch order, so the first
    k*world_size positions of the order are consumed after k samples per rank whatever the world
    size: ``set_epoch(epoch, consumed)`` skips the ``consumed`` global samples already trained on.

    With ``lengths`` the order is transformers' length-grouped one (a seeded permutation cut
    into megabatches of up to 50 global batches, each sorted by length), so each global batch
    of ``global_batch`` consecutive positions holds samples of similar length, and so do its
    micro-batches on every rank: little padding. It depends on the seed, the epoch and the
    global batch only, so global batch k is the same set of samples on any world size.
    """

    def __init__(self, dataset: Any, dist: Dist, seed: int, lengths: Sequence[int] | None = None,
                 global_batch: int = 0) -> None:
        super().__init__(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                         seed=seed, drop_last=True)
        if lengths is not None and (global_batch < 1 or global_batch % dist.world_size):
            raise ValueError(f"global batch {global_batch} is not a positive multiple of world size {dist.world_size}")
        self.lengths, self.global_batch = lengths, global_batch
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        if consumed % self.num_replicas:
            raise ValueError(f"consumed={consumed} is not a multiple of world size {self.num_replicas}")
        self.consumed = consumed

    def _epoch_order(self) -> list[int]:
        """This rank's share of the epoch's order."""
        if self.lengths is None:
            return list(super().__iter__())
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.global_batch, generator=generator)
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_order()[self.consumed // self.num_replicas:])

    def __len__(self) -> int:
        return self.num_samples - self.consumed // self.num_replicas


def _right_padded(rows: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """input_ids and labels of the rows, right-padded to the longest (padding: no loss), and
    each row's length."""
    lengths = [len(r["input_ids"]) for r in rows]
    input_ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
    return input_ids, labels, lengths


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch; padding carries no loss and no attention.
    ``sample_lengths`` holds each row's real token count (throughput counts no padding)."""
    input_ids, labels, lengths = _right_padded(rows, pad_id)
    attention_mask = (torch.arange(input_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "sample_lengths": torch.tensor(lengths), "logit_positions": logit_positions(labels)}


def collate_packs(packs: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to the longest of the batch. No attention_mask: position ids restart
    at 0 at each sample, and from those restarts transformers confines attention to each sample
    (``masking_utils.find_packed_sequence_indices``). The padding is one more segment of its own
    with ignored labels: it attends only to itself and carries no loss."""
    input_ids, labels, lengths = _right_padded(packs, pad_id)
    width = input_ids.shape[1]
    position_ids = torch.empty_like(input_ids)
    for i, (p, n) in enumerate(zip(packs, lengths, strict=True)):
        segments = p["sample_lengths"] + ([width - n] if width > n else [])
        position_ids[i] = torch.cat([torch.arange(length) for length in segments])
    sample_lengths = torch.tensor([n for p in packs for n in p["sample_lengths"]], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_lengths": sample_lengths,
            "logit_positions": logit_positions(labels)}


def _loader_generator() -> torch.Generator:
    """A generator of a loader's own, so that iterating it leaves the global torch RNG alone.

    Each ``iter(DataLoader)`` draws a base seed for workers from the loader's generator, or from
    the global torch RNG when it has none (torch/utils/data/dataloader.py:689-693), even with no
    workers. The global RNG draws the dropout masks and a checkpoint saves it mid-epoch, after
    the epoch's ``iter`` of the train loader; a resumed run restores it and then calls ``iter``
    again, one draw the uninterrupted run never made, and every mask after a resume differed.
    """
    return torch.Generator()


def train_loader(dataset: datasets.Dataset, sampler: ResumableDistributedSampler, micro_batch_size: int,
                 pad_id: int, packed: bool, device: torch.device) -> DataLoader:
    # Pinned host memory lets to_device copy without blocking the host (CUDA only).
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True,
                      collate_fn=functools.partial(collate_packs if packed else collate, pad_id=pad_id),
                      pin_memory=device.type == "cuda", generator=_loader_generator())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the device, copied asynchronously from pinned memory."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    return DataLoader(rows, batch_size=batch_size, shuffle=False, generator=_loader_generator(),
                      collate_fn=functools.partial(collate, pad_id=pad_id), pin_memory=dist.device.type == "cuda")
