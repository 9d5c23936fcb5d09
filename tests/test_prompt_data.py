import warnings

import pytest
import torch
from transformers import AutoTokenizer

from conftest import ORI_JSON, TOKENIZER
from medgpt.config import DataConfig
from medgpt.data import ResumableDistributedSampler, collate, eval_loader, tokenized_dataset, train_loader
from medgpt.distributed import Dist
from medgpt.errors import UserError
from medgpt.prompt import IGNORE_INDEX, answer_text, encode_example
from medgpt.pubmedqa import load_records


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_only_answer_tokens_carry_loss(tokenizer):
    enc = encode_example(tokenizer, "Is aspirin useful?", ["Aspirin was given.", "Pain fell."], " yes", 512)
    labelled = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    # The answer is the last two tokens: " yes" then EOS, and nothing before them carries loss.
    assert labelled == [len(enc.input_ids) - 2, len(enc.input_ids) - 1]
    assert [enc.labels[i] for i in labelled] == [tokenizer.encode(" yes")[0], tokenizer.eos_token_id]
    assert tokenizer.decode(enc.input_ids[:-2]).endswith("Question: Is aspirin useful?\nAnswer:")


def test_truncation_cuts_contexts_never_question_or_answer(tokenizer):
    question, answer = "Does a very long context get cut?", answer_text("maybe", "It depends on the study.")
    contexts = ["word " * 2000]
    enc = encode_example(tokenizer, question, contexts, answer, max_len=64)
    assert len(enc.input_ids) == 64
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith("Context: word word")
    assert text.endswith(f"\nQuestion: {question}\nAnswer: maybe. It depends on the study.<|endoftext|>")
    with pytest.raises(UserError, match="raise --seq_len"):
        encode_example(tokenizer, question, contexts, answer, max_len=8)


def test_tokenized_cache_is_built_once_and_reused(tokenizer, tmp_path):
    records = load_records(str(ORI_JSON))[:50]
    cfg = DataConfig(seq_len=256, cache_dir=str(tmp_path))
    first = tokenized_dataset(records, tokenizer, cfg, Dist.single())
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and first.cache_files  # memory-mapped from the on-disk cache
    again = tokenized_dataset(records, tokenizer, cfg, Dist.single())
    assert list(tmp_path.iterdir()) == built
    assert again["input_ids"] == first["input_ids"]
    assert max(len(ids) for ids in first["input_ids"]) <= 256
    # Another seq_len is another cache entry.
    tokenized_dataset(records, tokenizer, DataConfig(seq_len=128, cache_dir=str(tmp_path)), Dist.single())
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_shards_are_disjoint_and_cover_the_data(world):
    data = list(range(450))
    shards = [list(ResumableDistributedSampler(data, Dist(r, world, r, torch.device("cpu")), seed=7))
              for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 450 - 450 % world
    assert len({len(s) for s in shards}) == 1


def test_set_epoch_reshuffles_and_resumes_mid_epoch():
    data = list(range(100))
    sampler = ResumableDistributedSampler(data, Dist(1, 2, 1, torch.device("cpu")), seed=0)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0, consumed=20)  # 20 global samples done = 10 of this rank's
    assert list(sampler) == epoch0[10:] and len(sampler) == 40


def test_collate_pads_without_loss_or_attention():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_shards_are_equal_length_and_fillers_carry_no_loss():
    rows = [{"input_ids": [i, i], "labels": [i, i]} for i in range(5)]
    seen = []
    for rank in range(2):
        batches = list(eval_loader(rows, Dist(rank, 2, rank, torch.device("cpu")), batch_size=2, pad_id=0))
        assert sum(len(b["input_ids"]) for b in batches) == 3
        seen += [int(ids[0]) for b in batches for ids, lab in zip(b["input_ids"], b["labels"], strict=True)
                 if lab[0] != -100]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_iterating_the_loaders_leaves_the_dropout_rng_alone():
    """The global torch RNG draws the dropout masks and is checkpointed: a resumed run restores it
    and then starts its loaders again, so a loader that drew from it would shift every later mask."""
    rows = [{"input_ids": [i, i], "labels": [i, i]} for i in range(8)]
    sampler = ResumableDistributedSampler(rows, Dist.single(), seed=0)
    sampler.set_epoch(0, consumed=4)  # as a resumed run starts its epoch
    before = torch.get_rng_state()
    assert len(list(train_loader(rows, sampler, 2, pad_id=0, packed=False, device=torch.device("cpu")))) == 2
    assert len(list(eval_loader(rows, Dist.single(), 2, pad_id=0))) == 4
    assert torch.equal(torch.get_rng_state(), before)


def test_a_gpu_run_collates_the_same_batches_in_a_worker_process():
    """On a GPU the training loader collates in a worker process (pinning is skipped here: no GPU);
    the batches, their order and the global RNG stay those of the main-process loader."""
    rows = [{"input_ids": [i] * (1 + i % 3), "labels": [i] * (1 + i % 3)} for i in range(12)]
    batches = {}
    for device in ("cpu", "cuda"):
        sampler = ResumableDistributedSampler(rows, Dist.single(), seed=0)
        sampler.set_epoch(1, consumed=4)
        before = torch.get_rng_state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no GPU to pin for
            loader = train_loader(rows, sampler, 2, pad_id=0, packed=False, device=torch.device(device))
            batches[device] = list(loader)
        assert loader.num_workers == (device == "cuda")
        assert torch.equal(torch.get_rng_state(), before)
    assert len(batches["cpu"]) == 4
    for ours, theirs in zip(batches["cpu"], batches["cuda"], strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
