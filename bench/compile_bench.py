"""medgpt with --compile against medgpt eager, same work otherwise, side by side.

    python bench/compile_bench.py --sizes tiny,gpt2-124m --steps 20,4 --write

Both are real ``torchrun`` jobs of ``launcher/train.py`` (length-grouped batches), measured as
bench/bench.py measures medgpt: useful tokens/s over steps 2..N (the compiled run's first step
holds the compilation, and ``dynamic=True`` compiles no other training shape), the first step's
time from launch (compilation included) and the peak memory. Eager runs first, once untimed
(the tokenized-data cache); the repetitions then alternate the order.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# bench.py lies beside this script (bench/ is no package): found however this file is loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODEL_SHAPES, REPO, RESULTS, SHARED, Run, Work, machine, per_size, run_env, run_medgpt, work_parser

MODES = {"eager": {"packing": "false"}, "--compile": {"packing": "false", "compile": "true"}}


def bench_size(work: Work, reps: int, nproc: int, env: dict[str, str], tmp: Path, timeout: float) -> str:
    def run(name: str, steps: int, tag: str) -> Run:
        run_dir = tmp / f"{work.size}-{name.strip('-')}-{tag}"
        run_dir.mkdir()
        print(f"compile_bench: {work.size} {name} {tag} ({steps} steps)", file=sys.stderr, flush=True)
        return run_medgpt(work, MODES[name], steps, run_dir, nproc, env, timeout)

    run("eager", 2, "warmup")
    results: dict[str, list[Run]] = {name: [] for name in MODES}
    for rep in range(reps):
        for name in MODES if rep % 2 == 0 else reversed(MODES):
            results[name].append(run(name, work.steps, f"rep{rep}"))
    medians = {name: {k: statistics.median(r.metrics(None)[k] for r in runs) for k in runs[0].metrics(None)}
               for name, runs in results.items()}
    lines = [f"### {work.size} ({MODEL_SHAPES[work.size].relative_to(REPO)}): {nproc} ranks x micro batch "
             f"{work.micro_batch_size} x accumulation {work.grad_accum}, seq_len {work.seq_len}, {work.precision}, "
             f"{work.steps} steps, median of {reps} rep(s)", "",
             "| medgpt | useful tokens/s | vs eager | s/step | first step s (launch, compile) | peak mem GiB |",
             "|---|---|---|---|---|---|"]
    for name, m in medians.items():
        ratio = m["tokens_per_s"] / medians["eager"]["tokens_per_s"]
        lines.append(f"| {name} | {m['tokens_per_s']:,.0f} | {ratio:.2f}x"
                     f" | {m['step_s']:.3f} | {m['first_step_s']:.1f} | {m['peak_mem_gib']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = work_parser(__doc__, steps="20,4", min_steps=3, reps="1", micro_batch_size=2)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    p.add_argument("--write", action="store_true", help=f"append the results to {RESULTS.relative_to(REPO)}")
    args = p.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.steps, args.reps = (per_size(value, len(args.sizes)) for value in (args.steps, args.reps))
    if (any(s not in MODEL_SHAPES for s in args.sizes) or not args.steps or not args.reps or min(args.steps) < 3
            or min(args.reps) < 1):
        p.error(f"--sizes takes {', '.join(MODEL_SHAPES)}; --steps (>= 3) and --reps (>= 1): one whole number "
                "or one per size")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if torch.cuda.is_available():
        raise SystemExit("compile_bench: this benchmark measures the CPU (fp32, 2 ranks); on GPUs time "
                         "--compile with runs of your own")
    nproc, started, load = 2, datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    tables = []
    with tempfile.TemporaryDirectory(prefix="medgpt-compile-bench-") as tmp:
        for size, n, r in zip(args.sizes, args.steps, args.reps, strict=True):
            work = Work(size=size, tokenizer=SHARED / "gpt2-tokenizer", data=SHARED / "pubmedqa" / "ori_pqal.json",
                        ds_config=REPO / "ds_configs" / "zero2.json", cache_dir=Path(tmp) / "cache", precision="fp32",
                        seq_len=args.seq_len, micro_batch_size=args.micro_batch_size, grad_accum=1, steps=n,
                        packed_micro_batch_size=1)
            tables.append(bench_size(work, r, nproc, run_env(False, nproc), Path(tmp), args.timeout))
            print(tables[-1] + "\n", flush=True)
    if args.write:
        minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
        section = [f"## --compile vs eager, {started:%Y-%m-%d %H:%M} UTC", "", f"- machine: {machine()}",
                   f"- load average (1/5/15 min) at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
                   f"the whole invocation took {minutes:.1f} min",
                   f"- command: `{shlex.join(['python', 'bench/compile_bench.py', *argv])}`", "",
                   *[t + "\n" for t in tables]]
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(section))


if __name__ == "__main__":
    main(sys.argv[1:])
