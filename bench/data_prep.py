"""Data preparation at 1k and 211k questions: seconds and peak memory of each stage, and of the
command users run.

    python bench/data_prep.py --work /tmp/medgpt-data-bench [--write]

Two data sets: pqa_labeled (1,000 questions, ../shared/data) and a 211,269-row pqa_artificial
stand-in in the Hub's parquet layout (bench/make_pqa_artificial.py, written under --work). Each
stage runs in a process of its own, so its peak RSS is its own: load (parquet/JSON -> records
and split), bare tokenizer (the reference: the fast tokenizer's batch encode of the same texts,
1,000 records a call, nothing kept), tokenize (build the tokenized cache), cache (a later run: key
the cache and memory-map it), group (the sampler's length-grouped order of one epoch) and pack
(first-fit-decreasing into rows of seq_len, cached). Every stage but load loads the records
first, as a run does; its seconds exclude that, its peak RSS includes it. Last, the whole
command users run, ``launcher/prepare_data.py --packing true`` into an empty cache, as one
process: its wall seconds (imports and loading included) against the bare tokenizer's, and its
peak RSS. --write appends the table to bench/RESULTS.md, with the machine and its load average
(other work on it slows every stage).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import make_pqa_artificial  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
TOKENIZER = SHARED / "gpt2-tokenizer"
STAGES = ("load", "bare tokenizer", "tokenize", "cache", "group", "pack")
BARE_BATCH = 1_000  # records a call, as medgpt.data tokenizes them
GLOBAL_BATCH = 32  # the length-grouped order's megabatches are 50 global batches of this many


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss: KiB on Linux


def run_stage(stage: str, data_flags: list[str], cache: Path) -> dict[str, float]:
    """One stage in this process (the --stage child): its seconds and this process's peak RSS."""
    import torch

    from medgpt.config import parse_config
    from medgpt.data import ResumableDistributedSampler, packed_dataset, sample_lengths, tokenized_dataset
    from medgpt.distributed import Dist
    from medgpt.model import load_tokenizer
    from medgpt.prompt import answer_text, context_text, question_text
    from medgpt.pubmedqa import load_data

    cfg = parse_config([*data_flags, "--tokenizer", str(TOKENIZER), "--cache_dir", str(cache)])
    alone = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    start = time.perf_counter()
    records, split = load_data(cfg.data)
    if stage == "bare tokenizer":
        tokenizer = load_tokenizer(cfg.model)
        start = time.perf_counter()
        for first in range(0, len(records), BARE_BATCH):
            batch = records[first:first + BARE_BATCH]
            for texts in ([context_text(r.contexts) for r in batch], [question_text(r.question) for r in batch],
                          [answer_text(r.final_decision) for r in batch]):
                tokenizer(texts)
    elif stage != "load":
        tokenizer = load_tokenizer(cfg.model)
        start = time.perf_counter()
        tokens = tokenized_dataset(records, tokenizer, cfg.data, alone)
        if stage == "group":
            start = time.perf_counter()
            lengths = sample_lengths(tokens.select(split.train))
            sampler = ResumableDistributedSampler(lengths, alone, seed=0, lengths=lengths, global_batch=GLOBAL_BATCH)
            sampler.set_epoch(0)
            assert sorted(sampler) == list(range(len(lengths)))
        elif stage == "pack":
            start = time.perf_counter()
            packed_dataset(tokens, split.train, cfg.data.seq_len, alone)
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(), "questions": len(records)}


def child(stage: str, data_flags: list[str], cache: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--cache", str(cache), "--", *data_flags],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_command(data_flags: list[str], cache: Path) -> dict[str, float]:
    """launcher/prepare_data.py as a user runs it, into an empty cache (the --stage command child:
    the launcher is its only child, so RUSAGE_CHILDREN's peak is the launcher's)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launcher" / "prepare_data.py"), *data_flags, "--packing", "true",
                    "--tokenizer", str(TOKENIZER), "--cache_dir", str(cache)], check=True, capture_output=True)
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(resource.RUSAGE_CHILDREN)}


def measure(name: str, data_flags: list[str], work: Path) -> list[str]:
    """Table rows for one data set."""
    cache, command_cache = work / f"cache-{name}", work / f"cache-{name}-command"
    for folder in (cache, command_cache):  # an earlier bench's: every stage that builds must build
        shutil.rmtree(folder, ignore_errors=True)
    results = {stage: child(stage, data_flags, cache) for stage in STAGES}
    results["prepare_data.py (one process)"] = command = child("command", data_flags, command_cache)
    rows = [f"| {name} | {stage} | {r['seconds']:.2f} | {r['peak_rss_gib']:.2f} |" for stage, r in results.items()]
    ratio = command["seconds"] / results["bare tokenizer"]["seconds"]
    return [*rows, f"| {name} | prepare_data.py / bare tokenizer | {ratio:.2f}x | |"]


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f} at the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medgpt-data-bench"),
                        help="folder for the generated parquet and the caches (outside the repository)")
    parser.add_argument("--rows", type=int, default=make_pqa_artificial.ROWS, help="pqa_artificial rows")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--stage", choices=(*STAGES, "command"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args, data_flags = parser.parse_known_args()
    if args.stage:
        flags = [f for f in data_flags if f != "--"]
        run = run_command if args.stage == "command" else functools.partial(run_stage, args.stage)
        print(json.dumps(run(flags, args.cache)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    make_pqa_artificial.write(args.work, args.rows)
    seq = ["--seq_len", str(args.seq_len)]
    rows = [*measure("pqa_labeled, 1,000", ["--data", str(SHARED / "pubmedqa" / "ori_pqal.json"), *seq], args.work),
            *measure(f"pqa_artificial, {args.rows:,}", ["--data", str(args.work), "--subset", "pqa_artificial",
                                                         "--test_data", str(SHARED / "pubmedqa" / "ori_pqal.json"),
                                                         *seq], args.work)]
    table = "\n".join(["| questions | stage | seconds | peak RSS GiB |", "| --- | --- | ---: | ---: |", *rows])
    command = "python bench/" + Path(__file__).name + " " + shlex.join(sys.argv[1:])
    section = (f"\n## Data preparation, {datetime.date.today()}\n\nMachine: {machine()}. Command: `{command}` "
               f"(seq_len {args.seq_len}, GPT-2 tokenizer).\n\n{table}\n")
    print(section)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write(section)


if __name__ == "__main__":
    main()
