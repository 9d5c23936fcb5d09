"""medgpt against the Hugging Face Trainer + DeepSpeed on the same work, side by side.

    python bench/bench.py                              # both sizes, CPU: 2 ranks on gloo, fp32
    python bench/bench.py --sizes tiny --steps 56 --reps 3 --write
    python bench/bench.py --sizes gpt2-124m --lora_r 8 --steps 4 --reps 1   # LoRA vs full fine-tuning

Both sides are launched as real ``torchrun`` jobs with the same model shape (random init, one
seed), tokenizer, PubMedQA training fold, prompt (medgpt's tokenized cache), DeepSpeed JSON,
micro batch x accumulation x ranks, optimizer steps, learning rate and precision: medgpt as
``launcher/train.py`` (twice: with packing and with length-grouped batches, see
:func:`medgpt_modes`), the baseline as ``bench/hf_trainer.py``. Each side first runs once untimed
(DeepSpeed's JIT-compiled ops and the tokenized-data cache are then warm for both); then the
repetitions alternate the order of the sides, and the table holds medians over repetitions.
With ``--lora_r R`` the sides are medgpt's full fine-tuning (length-grouped) and medgpt with LoRA
adapters of rank R (medgpt/lora.py), everything else alike, and no baseline.

Measured from outside either training loop, the same way for both: the wall-clock end of every
optimizer step (medgpt: the wall time of its ``train/loss`` TensorBoard event, logged every step;
the baseline: a callback), non-pad tokens and padded positions per step, peak memory per rank.

- useful tokens/s = non-pad tokens of steps 2..N / (end of step N - end of step 1)
- padding = padded positions / positions computed, all steps
- first step = launch of torchrun by this script -> end of optimizer step 1
- MFU (GPU) = model FLOPs of steps 2..N (medgpt.throughput.step_flops for both) / time / peak

medgpt is stopped once step N is logged: its end-of-run dev and test scoring, checkpoint and
export are not training steps (the baseline evaluates and saves nothing).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medgpt.config import LORA_TARGETS
from medgpt.distributed import free_port
from medgpt.memory_plan import GiB

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "RESULTS.md"
MODEL_SHAPES = {"tiny": REPO / "configs" / "models" / "tiny.json",
                "gpt2-124m": REPO / "configs" / "models" / "gpt2-124m.json"}
BASELINE = "HF Trainer"

# medgpt's rows of the table: name -> launcher/train.py flags that differ from the shared work.
PACKING, GROUPED = "medgpt, packing", "medgpt, length-grouped"


def medgpt_modes(work: Work) -> dict[str, dict[str, object]]:
    """Packing counts micro_batch_size in packed rows of up to seq_len tokens: it gets as many
    rows as hold about the samples of one unpacked micro-batch (rounded), so both modes and the
    baseline train on about the same tokens per step. With LoRA: full fine-tuning and LoRA."""
    if work.lora_r:
        return {GROUPED: {"packing": "false"}, f"medgpt, LoRA r{work.lora_r}": {"packing": "false",
                                                                               "lora_r": work.lora_r}}
    return {PACKING: {"packing": "true", "micro_batch_size": work.packed_micro_batch_size},
            GROUPED: {"packing": "false"}}


def reference(work: Work) -> str:
    """The row the others are compared with: the HF Trainer, or full fine-tuning against LoRA."""
    return GROUPED if work.lora_r else BASELINE


@dataclass(frozen=True)
class Work:
    """What both sides train: one model size, same everything else."""
    size: str
    tokenizer: Path
    data: Path
    ds_config: Path
    cache_dir: Path
    precision: str
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    packed_micro_batch_size: int
    lr: float = 1e-4
    warmup_steps: int = 1
    dropout: float = 0.1
    seed: int = 42
    lora_r: int = 0  # > 0: LoRA against full fine-tuning (medgpt_modes), no baseline

    def flags(self, output_dir: Path, steps: int, **overrides: object) -> list[str]:
        """Flags both launchers share (same names on purpose)."""
        values = dict(model=MODEL_SHAPES[self.size], tokenizer=self.tokenizer, data=self.data,
                      ds_config=self.ds_config, cache_dir=self.cache_dir, precision=self.precision,
                      seq_len=self.seq_len, micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
                      max_steps=steps, lr=self.lr, warmup_steps=self.warmup_steps, dropout=self.dropout,
                      seed=self.seed, output_dir=output_dir)
        values.update(overrides)
        return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@dataclass
class Run:
    """One timed run: per optimizer step, all ranks."""
    launched: float  # time.time() just before torchrun started
    end_times: list[float]  # wall clock at the end of each step
    tokens: list[int]  # non-pad tokens
    positions: list[int]  # positions computed, padding included
    flops: list[float]  # model FLOPs (medgpt.throughput.step_flops)
    peak_mem_gib: float  # the largest rank's

    @property
    def elapsed(self) -> float:
        return self.end_times[-1] - self.end_times[0]

    def metrics(self, peak_tflops_total: float | None) -> dict[str, float]:
        m = {"tokens_per_s": sum(self.tokens[1:]) / self.elapsed,
             "step_s": self.elapsed / (len(self.end_times) - 1),
             "tokens_per_step": sum(self.tokens) / len(self.tokens),
             "padding": 1 - sum(self.tokens) / sum(self.positions),
             "peak_mem_gib": self.peak_mem_gib,
             "first_step_s": self.end_times[0] - self.launched}
        if peak_tflops_total:
            m["mfu"] = sum(self.flops[1:]) / self.elapsed / 1e12 / peak_tflops_total
        return m


def torchrun(script: Path, args: list[str], nproc: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a torchrun job in its own process group (so it can be stopped as a whole)."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script), *args]
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a job this script started: its whole process group, politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def failed(what: str, log: Path, code: int | None) -> RuntimeError:
    return RuntimeError(f"{what} failed (exit {code}); its log ({log}) ends with:\n{log.read_text()[-4000:]}")


def read_events(output_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def run_medgpt(work: Work, mode: dict[str, object], steps: int, run_dir: Path, nproc: int, env: dict[str, str],
               timeout: float) -> Run:
    """launcher/train.py with --log_every 1, stopped once step ``steps`` is logged."""
    log = run_dir / "log.txt"
    launched = time.time()
    proc = torchrun(REPO / "launcher" / "train.py", work.flags(run_dir, steps, log_every=1, eval_every=0, **mode),
                    nproc, log, env)
    last_tag = f"perf/peak_mem_gib/rank{nproc - 1}"  # the last scalar of a step's log call
    try:
        while True:
            time.sleep(0.5)
            if proc.poll() is not None and proc.returncode != 0:
                raise failed("medgpt", log, proc.returncode)
            events = read_events(run_dir) if (run_dir / "tensorboard").exists() else {}
            if any(e.step == steps for e in events.get(last_tag, [])):
                break
            if proc.poll() is not None:
                raise failed("medgpt (ended before its last step was logged)", log, proc.returncode)
            if time.time() - launched > timeout:
                raise failed(f"medgpt (over {timeout:.0f} s)", log, None)
    finally:
        stop(proc)
    by_step = {tag: {e.step: e for e in series} for tag, series in events.items()}
    order = range(1, steps + 1)
    tokens_per_s, step_s = by_step["perf/tokens_per_s"], by_step["perf/step_time_s"]
    tokens = [round(tokens_per_s[s].value * step_s[s].value) for s in order]
    padding = by_step["perf/padding_fraction"]
    return Run(launched=launched, end_times=[by_step["train/loss"][s].wall_time for s in order], tokens=tokens,
               positions=[round(t / (1 - padding[s].value)) for t, s in zip(tokens, order, strict=True)],
               flops=[by_step["perf/tflops"][s].value * 1e12 * step_s[s].value for s in order],
               peak_mem_gib=max(by_step[f"perf/peak_mem_gib/rank{r}"][steps].value for r in range(nproc)))


def run_baseline(work: Work, steps: int, run_dir: Path, nproc: int, env: dict[str, str], timeout: float) -> Run:
    """bench/hf_trainer.py, to its end; it writes one bench_rank<r>.json per rank."""
    log = run_dir / "log.txt"
    launched = time.time()
    proc = torchrun(REPO / "bench" / "hf_trainer.py", work.flags(run_dir, steps), nproc, log, env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise failed(f"the HF Trainer baseline (over {timeout:.0f} s)", log, None) from None
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise failed("the HF Trainer baseline", log, proc.returncode)
    ranks = [json.loads((run_dir / f"bench_rank{r}.json").read_text()) for r in range(nproc)]
    per_step = [[rank["steps"][i] for rank in ranks] for i in range(steps)]
    return Run(launched=launched, end_times=ranks[0]["end_times"],
               tokens=[sum(r["tokens"] for r in step) for step in per_step],
               positions=[sum(r["positions"] for r in step) for step in per_step],
               flops=[sum(r["flops"] for r in step) for step in per_step],
               peak_mem_gib=max(rank["peak_mem_bytes"] for rank in ranks) / GiB)


def samples_per_pack(tokenizer: Path, data: Path, seq_len: int, cache_dir: Path) -> float:
    """Mean training samples per packed row: medgpt's own packs (cached, as its runs read them)."""
    from transformers import AutoTokenizer

    from medgpt.config import DataConfig
    from medgpt.data import training_data
    from medgpt.distributed import Dist
    from medgpt.pubmedqa import load_records, official_split

    records = load_records(str(data))
    split = official_split(records, fold=0)
    cfg = DataConfig(data=str(data), seq_len=seq_len, cache_dir=str(cache_dir), packing=True)
    packs = training_data(records, split, AutoTokenizer.from_pretrained(tokenizer), cfg, Dist.single()).train
    return len(split.train) / len(packs)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    text = f"{cpu}, {os.cpu_count()} logical cores, {mem_kib / 2**20:.0f} GiB RAM"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("torch", "transformers", "deepspeed", "accelerate"))
    return f"{text}; Python {platform.python_version()}, {versions}"


def fmt_row(name: str, m: dict[str, float], baseline: dict[str, float], gpu: bool) -> str:
    cells = [name, f"{m['tokens_per_s']:,.0f}", f"{m['tokens_per_s'] / baseline['tokens_per_s']:.2f}x",
             f"{m['padding']:.1%}", f"{m['tokens_per_step']:,.0f}", f"{m['step_s']:.3f}", f"{m['peak_mem_gib']:.2f}",
             f"{m['first_step_s']:.1f}"]
    if gpu:
        cells.append(f"{m['mfu']:.1%}")
    return "| " + " | ".join(cells) + " |"


def table(work: Work, nproc: int, reps: int, results: dict[str, list[Run]], peak_total: float | None) -> str:
    gpu = peak_total is not None
    medians = {name: {k: statistics.median(r.metrics(peak_total)[k] for r in runs)
                      for k in runs[0].metrics(peak_total)} for name, runs in results.items()}
    header = ["framework", "useful tokens/s", f"vs {reference(work)}", "padding", "tokens/step", "s/step",
              "peak mem GiB (max rank)",
              "first step s"] + (["MFU"] if gpu else [])
    lines = [f"### {work.size} ({MODEL_SHAPES[work.size].relative_to(REPO)}): {nproc} ranks x micro batch "
             f"{work.micro_batch_size} x accumulation {work.grad_accum} = global batch "
             f"{nproc * work.micro_batch_size * work.grad_accum}, seq_len {work.seq_len}, {work.precision}, "
             f"{work.steps} steps, median of {reps} rep(s); packing: {work.packed_micro_batch_size} packed "
             f"row(s) per micro batch" + (f"; LoRA on {','.join(LORA_TARGETS)}" if work.lora_r else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [fmt_row(name, m, medians[reference(work)], gpu) for name, m in medians.items()]
    return "\n".join(lines)


def bench_size(work: Work, reps: int, nproc: int, env: dict[str, str], tmp: Path, timeout: float,
               peak_total: float | None, warmup: bool = True) -> str:
    def run(name: str, steps: int, tag: str) -> Run:
        run_dir = tmp / f"{work.size}-{name.replace(' ', '_')}-{tag}"
        run_dir.mkdir()
        print(f"bench: {work.size} {name} {tag} ({steps} steps)", file=sys.stderr, flush=True)
        if name == BASELINE:
            return run_baseline(work, steps, run_dir, nproc, env, timeout)
        return run_medgpt(work, modes[name], steps, run_dir, nproc, env, timeout)

    modes = medgpt_modes(work)
    names = [*modes] if work.lora_r else [*modes, BASELINE]
    for name in names if warmup else ():  # untimed: JIT-built ops and the data cache warm for both
        run(name, 1, "warmup")
    results: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            results[name].append(run(name, work.steps, f"rep{rep}"))
    return table(work, nproc, reps, results, peak_total)


def work_parser(doc: str, steps: str, min_steps: int, reps: str, micro_batch_size: int) -> argparse.ArgumentParser:
    """The flags every benchmark of this folder shares: which shapes, how many steps and repetitions."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,gpt2-124m", help=f"comma-separated: {', '.join(MODEL_SHAPES)}")
    p.add_argument("--steps", default=steps, help=f"optimizer steps per run (>= {min_steps}): one value, or one "
                   "per size")
    p.add_argument("--reps", default=reps, help="timed repetitions (>= 1): one value, or one per size")
    p.add_argument("--micro_batch_size", type=int, default=micro_batch_size)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    # tiny: one epoch of unpacked global batches of 8 (length-grouped order puts its longest
    # samples first: a part of an epoch would favour it). 124M on CPU: 15-30 s a step.
    p = work_parser(__doc__, steps="56,3", min_steps=2, reps="2", micro_batch_size=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=1024)  # medgpt's default, GPT-2's context
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPUs if torch sees any (bf16, one rank per GPU), else 2 CPU ranks (fp32)")
    p.add_argument("--nproc", type=int, default=0, help="ranks (0: one per GPU, or 2 on CPU)")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "gpt2-tokenizer")
    p.add_argument("--data", type=Path, default=SHARED / "pubmedqa" / "ori_pqal.json")
    p.add_argument("--ds_config", type=Path, default=REPO / "ds_configs" / "zero2.json")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--lora_r", type=int, default=0, help="> 0: medgpt with LoRA of this rank against full "
                   "fine-tuning, instead of medgpt against the HF Trainer")
    p.add_argument("--no_warmup", action="store_true", help="skip each side's untimed first run: the first "
                   "side then pays the op builds and data cache (a check that the bench runs, not a measurement)")
    p.add_argument("--write", action="store_true", help=f"append the results to {RESULTS.relative_to(REPO)}")
    args = p.parse_args(argv)
    args.sizes = args.sizes.split(",")
    unknown = [s for s in args.sizes if s not in MODEL_SHAPES]
    args.steps, args.reps = (per_size(value, len(args.sizes)) for value in (args.steps, args.reps))
    if unknown or not args.steps or not args.reps or min(args.steps) < 2 or min(args.reps) < 1:
        p.error(f"--sizes takes {', '.join(MODEL_SHAPES)}; --steps (>= 2) and --reps (>= 1) take one whole number "
                "or one per size")
    if args.write and args.no_warmup:
        p.error("--no_warmup timings include one-time builds and are not recorded: drop --write or --no_warmup")
    return args


def per_size(text: str, sizes: int) -> list[int]:
    """'5' or '5,2' (one per size) -> one int per size; [] if malformed."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        return []
    values = values * sizes if len(values) == 1 else values
    return values if len(values) == sizes else []


def resolved(args: argparse.Namespace, gpu: bool, nproc: int) -> str:
    """The settings this invocation ran with, defaults included (defaults may change)."""
    return (f"--sizes {','.join(args.sizes)} --steps {','.join(map(str, args.steps))} "
            f"--reps {','.join(map(str, args.reps))} --micro_batch_size {args.micro_batch_size} "
            f"--grad_accum {args.grad_accum} --seq_len {args.seq_len} --device {'gpu' if gpu else 'cpu'} "
            f"--nproc {nproc}" + (f" --lora_r {args.lora_r}" if args.lora_r else "")
            + (" --no_warmup" if args.no_warmup else ""))


def run_env(gpu: bool, nproc: int) -> dict[str, str]:
    """The environment of every timed job."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # The repo's own medgpt, whatever else is installed.
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # One JIT-compiled op folder for both sides (medgpt's default), so the warm-up warms both.
    if os.access(sys.prefix, os.W_OK):
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    nproc = args.nproc or (torch.cuda.device_count() if gpu else 2)
    env = run_env(gpu, nproc)
    peak_total = None
    if gpu:
        from medgpt.throughput import device_peak

        peak = device_peak(torch.device("cuda", 0), "bf16", 0)
        peak_total = peak.tflops * nproc
        print(f"bench: MFU against {peak.tflops:.4g} TFLOPS per GPU ({peak.source})", file=sys.stderr)

    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()
    tables = []
    with tempfile.TemporaryDirectory(prefix="medgpt-bench-") as tmp:
        cache_dir = Path(tmp) / "cache"
        per_pack = samples_per_pack(args.tokenizer, args.data, args.seq_len, cache_dir)
        for size, steps, reps in zip(args.sizes, args.steps, args.reps, strict=True):
            work = Work(size=size, tokenizer=args.tokenizer.resolve(), data=args.data.resolve(),
                        ds_config=args.ds_config.resolve(), cache_dir=cache_dir,
                        precision="bf16" if gpu else "fp32", seq_len=args.seq_len,
                        micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum, steps=steps,
                        packed_micro_batch_size=max(1, round(args.micro_batch_size / per_pack)),
                        lora_r=args.lora_r)
            tables.append(bench_size(work, reps, nproc, env, Path(tmp), args.timeout, peak_total,
                                      warmup=not args.no_warmup))
            print(tables[-1] + "\n", flush=True)
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    if args.write:
        command = shlex.join(["python", "bench/bench.py", *argv])
        section = [f"## {started:%Y-%m-%d %H:%M} UTC", "",
                   f"- machine: {machine()}",
                   f"- load average (1/5/15 min) at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
                   f"the whole invocation took {minutes:.1f} min",
                   f"- command: `{command}`; resolved: `{resolved(args, gpu, nproc)}`", "",
                   *[t + "\n" for t in tables]]
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(section))
        print(f"bench: appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
