"""From records to batches: tokenize once into an on-disk cache, optionally pack the training
samples into rows of seq_len tokens (cached too), shard with DistributedSampler, pad per batch."""
from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from medgpt.attention import DOCUMENT_MASK, document_mask
from medgpt.config import DataConfig
from medgpt.distributed import Dist
from medgpt.loss import count_label_tokens, logit_positions
from medgpt.prompt import (
    IGNORE_INDEX,
    PROMPT_FORMAT_VERSION,
    answer_text,
    context_text,
    encode_pieces,
    question_text,
)
from medgpt.pubmedqa import Record, Split

# Bump when the cache's layout changes (2: int32 tokens and a length column): it invalidates cached datasets.
CACHE_VERSION = 2
# Bump when the packing algorithm changes: it invalidates cached packs.
PACKING_VERSION = 2
# Token ids fit int32 (GPT-2: 50,257): half the cache of datasets' default int64.
TOKENS = datasets.Sequence(datasets.Value("int32"))
# Tokenized rows: a datasets.Dataset, or a list of the same dicts (scoring's prompts).
Rows = datasets.Dataset | Sequence[dict[str, list[int]]]
TOKENIZED = datasets.Features({"pubid": datasets.Value("string"), "input_ids": TOKENS, "labels": TOKENS,
                               "length": datasets.Value("int32")})
PACKED = datasets.Features({"rows": datasets.Sequence(datasets.Value("int64")), "input_ids": TOKENS,
                            "labels": TOKENS, "sample_lengths": TOKENS})
PACKS_PER_WRITE = 10_000  # packs assembled in memory at a time
TOKENIZE_BATCH = 1_000  # records tokenized (and written) at a time


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "medgpt"


def records_digest(records: list[Record]) -> str:
    """A digest of every field of every record, streamed: hashing the records as one Python
    object (datasets' Hasher) takes ~40 s for pqa_artificial's 211k, this ~4 s."""
    digest = hashlib.blake2b()
    for r in records:  # control characters as separators: PubMedQA's texts hold none
        digest.update("\x1e".join((r.pubid, r.question, "\x1f".join(r.contexts), r.long_answer, r.final_decision,
                                   "")).encode())
    return digest.hexdigest()


def _vocabulary(tokenizer: PreTrainedTokenizerBase) -> str | list[tuple[str, int]]:
    """What the token ids of a text depend on: the fast tokenizer's whole definition, else its vocabulary."""
    return tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else sorted(tokenizer.get_vocab().items())


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.blake2b(str(_vocabulary(tokenizer)).encode()).hexdigest()


def cache_key(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    """Everything the tokenized data depends on, and nothing else."""
    return Hasher.hash([PROMPT_FORMAT_VERSION, CACHE_VERSION, records_digest(records), _vocabulary(tokenizer),
                        tokenizer.eos_token_id, cfg.seq_len, cfg.long_answer])


def _encode_batch(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict[str, list]:
    """Records tokenized: each piece of the batch in one call (the fast tokenizer's batch encode
    runs on every core), then joined and truncated per record."""
    contexts, questions, answers = (tokenizer(texts)["input_ids"] for texts in (
        [context_text(r.contexts) for r in records], [question_text(r.question) for r in records],
        [answer_text(r.final_decision, r.long_answer if cfg.long_answer else "") for r in records]))
    out: dict[str, list] = {"pubid": [r.pubid for r in records], "input_ids": [], "labels": [], "length": []}
    for c, q, a in zip(contexts, questions, answers, strict=True):
        enc = encode_pieces(c, q, a, tokenizer.eos_token_id, cfg.seq_len)
        out["input_ids"].append(enc.input_ids)
        out["labels"].append(enc.labels)
        out["length"].append(len(enc.input_ids))
    return out


def _tokenize(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, folder: Path) -> None:
    """All records tokenized, in record order, written a batch at a time into ``folder``'s arrow
    file: no copy of every text, and no list of every token, is ever held in memory."""
    with ArrowWriter(path=str(folder / "data.arrow"), features=TOKENIZED) as writer, \
            tqdm(total=len(records), desc="tokenizing", unit="question", disable=len(records) < TOKENIZE_BATCH) as bar:
        for start in range(0, len(records), TOKENIZE_BATCH):
            batch = records[start:start + TOKENIZE_BATCH]
            writer.write_batch(_encode_batch(batch, tokenizer, cfg))
            bar.update(len(batch))
        writer.finalize()


def _tokenized_path(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Path:
    return _cache_root(cfg) / f"pubmedqa-{cache_key(records, tokenizer, cfg)}"


def _read(path: Path) -> datasets.Dataset:
    """A cache folder's arrow file, memory-mapped."""
    return datasets.Dataset.from_file(str(path / "data.arrow"))


def _build_once(path: Path, build: Callable[[Path], None], dist: Dist) -> datasets.Dataset:
    """The dataset cached at ``path``, built first if missing: local rank 0 builds it into a
    staging folder and publishes it, the other ranks wait and memory-map it."""
    if dist.local_rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        build(staging)
        try:  # atomic publish: a reader never sees half a cache, a racing builder loses quietly
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    return _read(path)


def tokenized_dataset(records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                      dist: Dist) -> datasets.Dataset:
    """All records tokenized, in record order (columns pubid, input_ids, labels, length). Built
    once per machine, then reused by every later run."""
    path = _tokenized_path(records, tokenizer, cfg)
    return _build_once(path, lambda folder: _tokenize(records, tokenizer, cfg, folder), dist)


class _Rooms:
    """The free room of bins 0..n-1 in a max segment tree; bins not opened yet have all of it.
    The first bin with room for k tokens is found by one walk down from the root, O(log n)."""

    def __init__(self, bins: int, capacity: int) -> None:
        self.leaves = 1 << max(bins - 1, 0).bit_length()
        self.tree = [capacity] * (2 * self.leaves)  # node i's children: 2i and 2i+1; leaves from self.leaves

    def first_fitting(self, need: int) -> int:
        """The lowest-numbered bin with room >= need (the root's room is the largest)."""
        node = 1
        while node < self.leaves:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        return node - self.leaves

    def take(self, bin_: int, tokens: int) -> None:
        node = bin_ + self.leaves
        self.tree[node] -= tokens
        while node > 1:
            node //= 2
            room = max(self.tree[2 * node], self.tree[2 * node + 1])
            if self.tree[node] == room:
                break  # the maxima above are unchanged too
            self.tree[node] = room


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most ``capacity`` tokens: longest first, each into the
    first bin with room. Deterministic (ties keep index order). O(n log n): the first bin with
    room comes from a segment tree over the bins' free room, not a scan of every open bin (the
    same bins as the scan: tests/test_packing.py compares them)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a bin of {capacity}")
    rooms = _Rooms(len(lengths), capacity)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = rooms.first_fitting(lengths[i])  # an unopened bin has full room: b <= len(bins)
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        rooms.take(b, lengths[i])
    return bins


def sample_lengths(samples: datasets.Dataset) -> list[int]:
    """The token count of every sample, as a list: datasets >= 4 answers ``samples["length"]``
    with a lazy Column whose every ``[i]`` is a query of its own (minutes for 211k lookups)."""
    return samples.with_format("arrow")["length"].to_pylist()


def _grouped(values: pa.Array, counts: np.ndarray) -> pa.ListArray:
    """``values`` cut into consecutive lists of ``counts`` items each."""
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), values)


def _pack(tokens: datasets.Dataset, rows: list[int], seq_len: int, folder: Path) -> None:
    """Pack the samples ``rows`` of ``tokens``, written as one arrow file into ``folder``, a
    slice of packs at a time: arrow concatenates the token columns, no Python list holds them."""
    packs = first_fit_decreasing(sample_lengths(tokens.select(rows)), seq_len)
    with ArrowWriter(path=str(folder / "data.arrow"), features=PACKED) as writer:
        for start in range(0, len(packs), PACKS_PER_WRITE):
            members = [rows[i] for pack in packs[start:start + PACKS_PER_WRITE] for i in pack]
            counts = np.array([len(pack) for pack in packs[start:start + PACKS_PER_WRITE]])
            samples = tokens.select(members).with_format("arrow")[:]
            lengths = samples.column("length").combine_chunks()
            pack_tokens = np.add.reduceat(lengths.to_numpy(), np.cumsum(counts) - counts)
            writer.write_table(pa.table({
                "rows": _grouped(pa.array(members, pa.int64()), counts),
                **{name: _grouped(pc.list_flatten(samples.column(name)).combine_chunks(), pack_tokens)
                   for name in ("input_ids", "labels")},
                "sample_lengths": _grouped(lengths, counts)}))
        writer.finalize()


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
    return _build_once(path, lambda folder: _pack(tokens, rows, seq_len, folder), dist)


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


def _right_padded(rows: list[dict[str, Any]], pad_id: int,
                  width: int | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """input_ids and labels of the rows, right-padded to ``width`` or else the longest (padding: no
    loss), and each row's length."""
    lengths = [len(r["input_ids"]) for r in rows]
    input_ids = torch.full((len(rows), width or max(lengths)), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
    return input_ids, labels, lengths


# Per micro-batch, counted on the host when the batch is made (the step then reads nothing back
# for them): what throughput and the loss normalisation need (medgpt.train.train_step).
COUNTS = ("answer_tokens", "tokens", "positions", "samples", "length_squares")
HOST_ONLY = ("sample_lengths", "counts")  # what to_device leaves on the host
LOADER_PREFETCH = 8  # micro-batches a GPU run's loader worker keeps ready (a step takes grad_accum of them)


def _counts(labels: torch.Tensor, sample_lengths: list[int]) -> torch.Tensor:
    """The batch's COUNTS, float64 (exact for any realistic count)."""
    return torch.tensor([count_label_tokens(labels), sum(sample_lengths), labels.numel(), len(sample_lengths),
                         sum(n * n for n in sample_lengths)], dtype=torch.float64)


def collate(rows: list[dict[str, Any]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to ``width`` (--compile: one shape, see medgpt/compilation.py) or else the longest
    row of the batch; padding carries no loss. No mask reaches the
    model in training (medgpt/attention.py); ``attention_mask`` is for scoring, which reads each
    row's last real position from it. ``sample_lengths`` holds each row's real token count
    (throughput counts no padding)."""
    input_ids, labels, lengths = _right_padded(rows, pad_id, width)
    attention_mask = (torch.arange(input_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "sample_lengths": torch.tensor(lengths), "logit_positions": logit_positions(labels),
            "counts": _counts(labels, lengths)}


def collate_packs(packs: list[dict[str, Any]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to ``width`` or else the longest of the batch. Position ids restart at 0 at each sample;
    ``document_mask`` keeps attention inside each sample (medgpt/attention.py). The padding is one
    more segment of its own with ignored labels: it attends only to itself and carries no loss."""
    input_ids, labels, lengths = _right_padded(packs, pad_id, width)
    width = input_ids.shape[1]
    position_ids = torch.empty_like(input_ids)
    for i, (p, n) in enumerate(zip(packs, lengths, strict=True)):
        segments = p["sample_lengths"] + ([width - n] if width > n else [])
        position_ids[i] = torch.cat([torch.arange(length) for length in segments])
    samples = [n for p in packs for n in p["sample_lengths"]]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            DOCUMENT_MASK: document_mask(position_ids), "sample_lengths": torch.tensor(samples, dtype=torch.long),
            "logit_positions": logit_positions(labels), "counts": _counts(labels, samples)}


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
                 pad_id: int, packed: bool, device: torch.device, width: int | None = None) -> DataLoader:
    """Training batches, rows padded to ``width`` if given. On a GPU the next micro-batches are read
    and collated in a worker process while the step runs, and pinned (host memory the device copies
    from without making the host wait: to_device); the main thread only hands them over. A CPU
    run keeps collating in the main process: its cores are the ranks' own."""
    gpu = device.type == "cuda"
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True,
                      collate_fn=functools.partial(collate_packs if packed else collate, pad_id=pad_id, width=width),
                      pin_memory=gpu, num_workers=int(gpu), persistent_workers=gpu,
                      prefetch_factor=LOADER_PREFETCH if gpu else None, generator=_loader_generator())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the device (all but its host-side counts), copied asynchronously from pinned memory."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in HOST_ONLY}


def shard_positions(num_rows: int, dist: Dist) -> list[int]:
    """This rank's strided share of ``num_rows`` dataset positions; positions past the end
    (``>= num_rows``) are filler rows, so that every rank gets as many."""
    per_rank = math.ceil(num_rows / dist.world_size)
    return list(range(dist.rank, per_rank * dist.world_size, dist.world_size))


def eval_positions(dataset: Rows, dist: Dist) -> list[int]:
    """The dataset positions :func:`eval_loader` gives this rank, in its order: the rank's shard,
    longest row first. A batch pads to its longest row, so batching rows of about one length
    computes less padding (PubMedQA's prompts run from ~100 to over 1,000 tokens), and the LM head
    runs at fewer distinct last positions (scoring.decision_probabilities); longest first, a batch
    too big for memory fails at once. Filler rows last."""
    shard = shard_positions(len(dataset), dist)
    return sorted(shard, key=lambda pos: -len(dataset[pos]["input_ids"]) if pos < len(dataset) else 0)


def eval_loader(dataset: Rows, dist: Dist, batch_size: int, pad_id: int) -> DataLoader:
    """This rank's shard in :func:`eval_positions` order. Every rank gets the same number of rows
    (ZeRO-3 needs all ranks in every forward): short shards are topped up with a row whose labels
    are all ignored, so it adds nothing to any sum."""
    rows = []
    for pos in eval_positions(dataset, dist):
        if pos < len(dataset):
            rows.append(dataset[pos])
        else:
            filler = dataset[0]
            rows.append({**filler, "labels": [IGNORE_INDEX] * len(filler["labels"])})
    return DataLoader(rows, batch_size=batch_size, shuffle=False, generator=_loader_generator(),
                      collate_fn=functools.partial(collate, pad_id=pad_id), pin_memory=dist.device.type == "cuda")
