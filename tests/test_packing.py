"""Packing (several samples per row, attention and loss per sample), length-grouped batching,
and the cache that prepare_data.py builds ahead of training."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import ORI_JSON, REPO, TINY_MODEL, TOKENIZER, check_ok, launch, read_scalars, refused, tiny_args
from medgpt.attention import ATTENTION, DOCUMENT_MASK, document_mask
from medgpt.config import DataConfig
from medgpt.data import (
    ResumableDistributedSampler,
    collate,
    collate_packs,
    first_fit_decreasing,
    packed_dataset,
    padding_fraction,
    sample_lengths,
    tokenized_dataset,
)
from medgpt.distributed import Dist
from medgpt.errors import UserError
from medgpt.loss import label_loss_sum
from medgpt.model import PACKING_TOLERANCE, PROBE_SHAPE, check_packing_isolation, packed_sample_difference
from medgpt.prompt import IGNORE_INDEX
from medgpt.pubmedqa import load_records, official_split

PREPARE_PY = str(REPO / "launcher" / "prepare_data.py")


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """The real tokenized PubMedQA at seq_len 1024, the fold-0 train rows and their packs."""
    records = load_records(str(ORI_JSON))
    train_rows = official_split(records, fold=0).train
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    cfg = DataConfig(seq_len=1024, cache_dir=str(tmp_path_factory.mktemp("pack-cache")))
    tokens = tokenized_dataset(records, tokenizer, cfg, Dist.single())
    return tokens, train_rows, packed_dataset(tokens, train_rows, cfg.seq_len, Dist.single())


def test_packs_hold_every_training_sample_once_with_little_padding(real_data):
    tokens, train_rows, packs = real_data
    assert sorted(r for rows in packs["rows"] for r in rows) == sorted(train_rows)
    for pack in packs:
        assert len(pack["input_ids"]) == len(pack["labels"]) == sum(pack["sample_lengths"]) <= 1024
        assert pack["input_ids"] == [t for r in pack["rows"] for t in tokens[r]["input_ids"]]
    assert padding_fraction(packs, 1024) < 0.05


def scanning_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, O(samples x bins): longest first (ties in index order), each into
    the first bin, scanned from the start, with room. The reference medgpt's segment tree must match."""
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


def test_first_fit_decreasing_packs_as_the_scanning_reference(real_data):
    tokens, train_rows, packs = real_data
    lengths = sample_lengths(tokens.select(train_rows))
    assert first_fit_decreasing(lengths, 1024) == scanning_first_fit_decreasing(lengths, 1024)
    assert packs["rows"] == [[train_rows[i] for i in b] for b in first_fit_decreasing(lengths, 1024)]
    rng = random.Random(0)
    for _ in range(100):  # small and odd cases: 0-1 items, items of exactly the capacity, many ties
        capacity = rng.randint(1, 60)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 50))]
        assert first_fit_decreasing(lengths, capacity) == scanning_first_fit_decreasing(lengths, capacity)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([3, 9], 8)


def test_no_position_predicts_across_a_sample_boundary(real_data):
    """Every sample starts with an unlabelled prompt token, so the shifted loss (position p
    predicts p+1) never asks the end of one sample for the start of the next, nor for padding."""
    _, _, packs = real_data
    two = [packs[0], packs[len(packs) - 1]]
    batch = collate_packs(two, pad_id=0)
    starts = torch.zeros_like(batch["labels"], dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = batch["position_ids"][:, 1:] == 0  # a new sample or the padding segment
    assert batch["position_ids"][1, -1] > 0  # the second row is padded: a segment of its own
    assert starts.sum() == len(batch["sample_lengths"]) + 1
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    assert batch["sample_lengths"].tolist() == two[0]["sample_lengths"] + two[1]["sample_lengths"]


def tiny_model() -> GPT2LMHeadModel:
    """In float64: the equivalences below compare sums taken in another order (another row
    length, another batch), whose float32 rounding differs from CPU to CPU by more than a fixed
    tolerance (1.6e-5 on an AMD EPYC). In float64 that rounding is ~1e-13, far inside
    torch.testing's float64 tolerances (1e-7), on any CPU; a real leak is orders larger."""
    config = GPT2Config.from_json_file(str(TINY_MODEL))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config._attn_implementation = ATTENTION  # as medgpt.model.build_model builds it
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double()


def only_sample(batch: dict[str, torch.Tensor], row: int, start: int, length: int) -> dict[str, torch.Tensor]:
    """The packed batch with the labels of one sample only."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[row, start:start + length] = batch["labels"][row, start:start + length]
    return {**batch, "labels": labels}


def test_packed_loss_and_gradients_equal_each_sample_alone(real_data):
    tokens, _, packs = real_data
    two = [max(packs, key=lambda p: len(p["sample_lengths"])), packs[len(packs) - 1]]  # the second is padded
    batch = collate_packs(two, pad_id=50256)
    model = tiny_model()

    checked = 0
    for row, pack in enumerate(two):
        start = 0
        for sample, length in zip(pack["rows"], pack["sample_lengths"], strict=True):
            with torch.no_grad():
                packed = label_loss_sum(model, only_sample(batch, row, start, length))
                alone = label_loss_sum(model, collate([tokens[sample]], pad_id=50256))
            torch.testing.assert_close(packed, alone)
            start, checked = start + length, checked + 1
    assert checked == len(batch["sample_lengths"]) >= 4

    label_loss_sum(model, batch).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for sample in [r for pack in two for r in pack["rows"]]:
        label_loss_sum(model, collate([tokens[sample]], pad_id=50256)).backward()
    for packed_grad, p in zip(packed_grads, model.parameters(), strict=True):
        torch.testing.assert_close(packed_grad, p.grad)


def test_attention_stays_within_each_sample(real_data):
    _, _, packs = real_data
    pack = max(packs, key=lambda p: len(p["sample_lengths"]))
    batch = collate_packs([pack], pad_id=50256)
    first = pack["sample_lengths"][0]
    changed = batch["input_ids"].clone()
    changed[0, :first] = torch.randint(0, 50000, (first,), generator=torch.Generator().manual_seed(0))
    model = tiny_model()

    def hidden(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states after sample A: the LM head maps each position alone, so where
        these are equal the logits are (and the 50,257-wide head is skipped: most of the test's time)."""
        with torch.no_grad():  # called as the loss calls the model (medgpt/loss.py, medgpt/attention.py)
            return model.transformer(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                     **{DOCUMENT_MASK: document_mask(position_ids)}).last_hidden_state[0, first:]

    # Other tokens in sample A leave every later sample's states as they were...
    torch.testing.assert_close(hidden(changed, batch["position_ids"]),
                               hidden(batch["input_ids"], batch["position_ids"]))
    # ...whereas one causal sequence (positions not restarting) lets them through.
    plain = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    assert not torch.allclose(hidden(changed, plain), hidden(batch["input_ids"], plain), atol=1e-3)


def micro_batches(world: int, accum: int, micro: int, lengths: list[int], grouped: bool) -> list[list[list[int]]]:
    """Per optimizer step, the micro-batches of every rank (rank-major) of epoch 0."""
    global_batch = world * accum * micro
    shards = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(lengths, Dist(rank, world, rank, torch.device("cpu")), seed=3,
                                              lengths=lengths if grouped else None, global_batch=global_batch)
        sampler.set_epoch(0)
        order = list(sampler)
        shards.append([order[i:i + micro] for i in range(0, len(order) - micro + 1, micro)])
    steps = len(lengths) // global_batch
    return [[shard[k * accum + j] for shard in shards for j in range(accum)] for k in range(steps)]


def padding_share(steps: list[list[list[int]]], lengths: list[int]) -> float:
    padded = sum(max(lengths[i] for i in mb) * len(mb) for step in steps for mb in step)
    return 1 - sum(lengths[i] for step in steps for mb in step for i in mb) / padded


def test_length_grouping_cuts_padding_and_keeps_global_batches(real_data):
    tokens, train_rows, _ = real_data
    lengths = [len(tokens[r]["input_ids"]) for r in train_rows]
    grouped = micro_batches(2, 2, 4, lengths, grouped=True)
    shuffled = micro_batches(2, 2, 4, lengths, grouped=False)
    assert padding_share(grouped, lengths) < padding_share(shuffled, lengths) / 4
    # Global batch k is the same samples on 2 ranks x accumulation 2 and on 1 rank x accumulation 4.
    alone = micro_batches(1, 4, 4, lengths, grouped=True)
    assert [sorted(i for mb in step for i in mb) for step in grouped] == \
           [sorted(i for mb in step for i in mb) for step in alone]
    # Every step is a new set of samples, and mid-epoch resume skips whole global batches.
    flat = [i for step in grouped for mb in step for i in mb]
    assert len(flat) == len(set(flat)) == len(lengths) // 16 * 16
    sampler = ResumableDistributedSampler(lengths, Dist(1, 2, 1, torch.device("cpu")), seed=3, lengths=lengths,
                                          global_batch=16)
    sampler.set_epoch(0)
    epoch = list(sampler)
    sampler.set_epoch(0, consumed=32)
    assert list(sampler) == epoch[16:]


@pytest.fixture(scope="module")
def prepared_then_trained(tmp_path_factory):
    """prepare_data.py builds the packed cache; a 2-rank packed run then trains from it."""
    cache, out = tmp_path_factory.mktemp("prepared-cache"), tmp_path_factory.mktemp("packed-run")
    args = tiny_args(out, cache, packing="on", max_steps=4, eval_every=0)
    prepare = launch(args, script=PREPARE_PY, timeout=300)
    check_ok(prepare)
    before = {p.name: p.stat().st_ino for p in cache.iterdir()}
    run = launch(args, launcher="torchrun", nproc=2)
    check_ok(run)
    return prepare, before, cache, run, out


@pytest.mark.e2e
def test_prepare_data_builds_the_cache_training_reuses(prepared_then_trained):
    prepare, before, cache, run, _ = prepared_then_trained
    built = next(line for line in prepare.stdout.splitlines() if "built training data cache" in line)
    assert "padding" in prepare.stdout and built.split()[-1] in run.stdout
    assert f"reused training data cache {built.split()[-1]}" in run.stdout
    # Nothing was tokenized or packed again: the same folders (inodes), and no staging folder.
    assert {p.name: p.stat().st_ino for p in cache.iterdir()} == before
    assert len(before) == 2 and not any(name.startswith(".building-") for name in before)


@pytest.mark.e2e
def test_two_rank_packed_run_trains(prepared_then_trained):
    *_, out = prepared_then_trained
    scalars = read_scalars(out)
    losses = [v for _, v in scalars["train/loss"]]
    assert len(losses) == 4 and all(0 < v < 20 for v in losses) and losses[-1] < losses[0]


@pytest.mark.e2e
@pytest.mark.parametrize("change, fix", [(dict(packing="off"), "resume with --packing on"),
                                         # seq_len defines the run (medgpt/resume_settings.py), packed or not
                                         (dict(packing="on", seq_len=512), "--seq_len: checkpoint 384, this run 512")])
def test_resume_with_other_packing_is_refused(prepared_then_trained, data_cache, change, fix):
    *_, out = prepared_then_trained
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = launch(tiny_args(out, data_cache, max_steps=8, eval_every=0, **change))
    refused(proc)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("medgpt: error: checkpoint") and fix in error
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_the_installed_transformers_keeps_packed_samples_apart():
    check_packing_isolation()  # what --packing on checks at start


def test_packing_is_refused_where_packed_samples_see_each_other():
    """What a transformers that dropped the document mask on its way to the attention would compute:
    one causal mask over the row."""
    model = GPT2LMHeadModel(GPT2Config(**PROBE_SHAPE)).eval()

    def one_mask_per_row(ids, pos):
        return model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits

    assert packed_sample_difference(one_mask_per_row) > 100 * PACKING_TOLERANCE
    with pytest.raises(UserError, match=r"--packing on: with the installed transformers \S+ a packed sample attends "
                                        r"to the sample before it .* or train with --packing off"):
        check_packing_isolation(one_mask_per_row)
