"""Host overhead of medgpt's training step against a plain PyTorch loop, on any machine.

    python bench/host_overhead.py                 # CPU: ZeRO 0/1/2 x accumulation 1/4, unpacked and packed
    python bench/host_overhead.py --write         # and append the table to bench/RESULTS.md
    python bench/host_overhead.py --json --steps 2 --stages 1  # counts only, one JSON line (tests)

The model has GPT-2 124M's module tree (12 blocks, 148 parameter tensors, the same kernels per
step) at a tiny width, so its FLOPs are negligible and a step is all overhead: what the host does
to issue the work. On a GPU that overhead is what leaves the device idle. Both sides train the
same model class from the same weights on the same fixed batches (medgpt's own collate, unpacked
and packed) with the same answer-only loss (medgpt.loss.label_loss_sum), in one process,
interleaved (each round runs every variant once):

- **medgpt**: the engine DeepSpeed builds from medgpt's resolved ds_configs/zero{0,1,2}.json and
  medgpt.train.train_step, the loop's step (loss normalisation, counts, the end-of-step read);
- **reference**: the loop a PyTorch user writes: autocast where the device has it, AdamW fused
  (else foreach), foreach gradient clipping, ``zero_grad(set_to_none=True)``, the loss summed on
  the device, no host read.

Per optimizer step: non-view aten ops (a TorchDispatchMode), host reads (aten._local_scalar_dense,
which ``.item()``, ``bool()``, ``int()`` and ``float()`` of a tensor come down to, plus
``Tensor.tolist``/``numpy``/``cpu`` calls and device synchronize calls) and the median wall time.
On a CPU every tensor lives on the host, so each read counted here is one that, on a GPU, reads
the device or would if its operand were there: the count is an upper bound of the stalls.
Targets (issue 19): ops medgpt/reference <= 1.2 at ZeRO-1 and <= 1.3 at ZeRO-0/2, at most 2
host reads per optimizer step, wall time medgpt/reference <= 1.3.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from medgpt.attention import ATTENTION  # noqa: E402
from medgpt.config import Config, ModelConfig  # noqa: E402
from medgpt.data import collate, collate_packs  # noqa: E402
from medgpt.distributed import Dist  # noqa: E402
from medgpt.loss import label_loss_sum  # noqa: E402
from medgpt.prompt import IGNORE_INDEX  # noqa: E402
from medgpt.shutdown import exit_process  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
# GPT-2 124M's tree (12 blocks, 148 tensors) at a width where the FLOPs do not matter.
SHAPE = {"n_layer": 12, "n_head": 2, "n_embd": 32, "n_positions": 256, "vocab_size": 50257}
SEQ_LEN, MICRO_BATCH, ANSWER_TOKENS = 256, 4, 2
TARGETS = {"ops": {0: 1.3, 1: 1.2, 2: 1.3}, "reads": 2, "wall": 1.3}
READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy to the host without an aten op on a CPU


# Whose code made a read: the innermost frame in medgpt's or a library's folder; torch only when
# none of the others is on the stack (torch's own wrappers sit between a library and the read).
OWNERS = {"medgpt": str(REPO / "medgpt"), "deepspeed": "/deepspeed/", "transformers": "/transformers/"}


def read_owner() -> str:
    frame, seen_torch = sys._getframe(2), False
    while frame is not None:
        name = frame.f_code.co_filename
        owner = next((owner for owner, marker in OWNERS.items() if marker in name), None)
        if owner:
            return owner
        seen_torch = seen_torch or "/torch/" in name
        frame = frame.f_back
    return "torch" if seen_torch else "other"


class StepCounter(TorchDispatchMode):
    """Non-view aten ops, and host reads by whose code made them, while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[read_owner()] += 1
        elif not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_reads(counter: StepCounter) -> Iterator[None]:
    """The counter, plus the host reads that dispatch no aten op on a CPU (Tensor.tolist and
    friends, device synchronize calls), counted by wrapping them for the block's duration."""
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    patched = [(torch.Tensor, name) for name in READS] + [(torch.cuda, "synchronize"), (accelerator, "synchronize")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in patched]

    def wrap(real: Callable) -> Callable:
        def counted(*args, **kwargs):
            counter.reads[read_owner()] += 1
            return real(*args, **kwargs)
        return counted
    for owner, name, real in originals:
        setattr(owner, name, wrap(real))
    try:
        with counter:
            yield
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)


def micro_batches(packed: bool, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` micro-batches from medgpt's collate: prompts of random length and tokens, each
    ending in an answer and EOS that carry the loss (as medgpt's prompts do)."""
    g = torch.Generator().manual_seed(seed)

    def sample(length: int) -> dict[str, list[int]]:
        ids = torch.randint(0, SHAPE["vocab_size"], (length,), generator=g).tolist()
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * (length - ANSWER_TOKENS) + ids[-ANSWER_TOKENS:]}

    def length() -> int:
        return int(torch.randint(SEQ_LEN // 4, SEQ_LEN, (), generator=g))
    batches = []
    for _ in range(count):
        if not packed:
            batches.append(collate([sample(length()) for _ in range(MICRO_BATCH)], pad_id=0))
            continue
        packs = []
        for _ in range(MICRO_BATCH):
            lengths = [length() // 3 for _ in range(3)]
            parts = [sample(n) for n in lengths]
            packs.append({"input_ids": [t for p in parts for t in p["input_ids"]],
                          "labels": [t for p in parts for t in p["labels"]], "sample_lengths": lengths})
        batches.append(collate_packs(packs, pad_id=0))
    return batches


def build_model(seed: int) -> GPT2LMHeadModel:
    """The model both sides train: medgpt's attention (a plain loop's is_causal SDPA, and the
    document mask of packed rows), no dropout."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation=ATTENTION))


@dataclass
class Variant:
    """One side at one setting: ``step`` runs one optimizer step over the given micro-batches."""
    name: str
    stage: int | None  # None: the reference loop
    accum: int
    packed: bool
    step: Callable[[list[dict[str, torch.Tensor]]], None]
    times: list[float] = field(default_factory=list)
    ops: int = 0
    reads: dict[str, int] = field(default_factory=dict)


def medgpt_variant(stage: int, accum: int, packed: bool, precision: str, device: torch.device,
                   dist: Dist) -> Variant:
    from medgpt.ds_config import load_ds_config, resolve_ds_config
    from medgpt.startup import initialize_engine
    from medgpt.train import train_step

    cfg = Config()
    cfg.model = ModelConfig(model="bench", dropout=0.0)
    cfg.train.micro_batch_size, cfg.train.grad_accum = MICRO_BATCH, accum
    cfg.train.precision = precision
    ds_config = resolve_ds_config(load_ds_config(str(REPO / "ds_configs" / f"zero{stage}.json")), cfg, 1,
                                  total_steps=10**6, hidden_size=SHAPE["n_embd"], on_gpu=device.type == "cuda")
    engine = initialize_engine(build_model(seed=0), ds_config, dist)

    def step(batches: list[dict[str, torch.Tensor]]) -> None:
        train_step(engine, batches, dist, stop_requested=False, grad_clip=cfg.optim.grad_clip)
    return Variant(f"medgpt ZeRO-{stage}", stage, accum, packed, step)


def reference_variant(batches: list[dict[str, torch.Tensor]], packed: bool, precision: str,
                      device: torch.device) -> Variant:
    model = build_model(seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    # The normaliser, counted once on the host copies (a real loop's data pipeline does this).
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)

    def step(batches: list[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = label_loss_sum(model, on_device) / total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Variant("reference", None, len(batches), packed, step)


def measure(variant: Variant, batches: list[dict[str, torch.Tensor]], steps: int, count: bool,
            device: torch.device) -> None:
    """``steps`` optimizer steps, each timed to the device's completion; with ``count``, one more
    step under the counter."""
    for _ in range(steps):
        start = time.perf_counter()
        variant.step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        variant.times.append(time.perf_counter() - start)
    if count:
        counter = StepCounter()
        with counting_reads(counter):
            variant.step(batches)
        variant.ops, variant.reads = counter.ops, dict(counter.reads)


def run(stages: list[int], accums: list[int], precision: str, steps: int, rounds: int,
        device: torch.device) -> list[dict]:
    from medgpt.distributed import init_distributed

    dist = init_distributed(device.type)
    pairs = []
    for packed in (False, True):
        for accum in accums:
            batches = micro_batches(packed, accum, seed=accum)
            ref = reference_variant(batches, packed, precision, device)
            pairs += [(medgpt_variant(s, accum, packed, precision, device, dist), ref, batches) for s in stages]
    refs = {id(ref): (ref, batches) for _, ref, batches in pairs}
    for r in range(rounds + 1):  # round 0: warm-up, untimed; counts taken in the last round
        last = r == rounds
        for variant, _, batches in pairs:
            measure(variant, batches, steps, last, device)
        for ref, batches in refs.values():
            measure(ref, batches, steps, last, device)
        if r == 0:
            for variant in [p[0] for p in pairs] + [ref for ref, _ in refs.values()]:
                variant.times.clear()
    rows = []
    for variant, ref, _ in pairs:
        rows.append({"stage": variant.stage, "accum": variant.accum, "packed": variant.packed,
                     "ops": variant.ops, "ref_ops": ref.ops, "reads": variant.reads, "ref_reads": ref.reads,
                     "ms": _median_ms(variant.times), "ref_ms": _median_ms(ref.times)})
    return rows


def _median_ms(times: list[float]) -> float | None:
    return 1e3 * statistics.median(times) if times else None  # None: --rounds 0, counts only


def verdicts(row: dict) -> dict[str, bool]:
    return {"ops": row["ops"] / row["ref_ops"] <= TARGETS["ops"][row["stage"]],
            "reads": sum(row["reads"].values()) <= TARGETS["reads"],
            "wall": row["ms"] / row["ref_ms"] <= TARGETS["wall"]}


def _reads(reads: dict[str, int]) -> str:
    """'3 (medgpt 1, deepspeed 2)'"""
    parts = ", ".join(f"{owner} {n}" for owner, n in sorted(reads.items()))
    return f"{sum(reads.values())}" + (f" ({parts})" if parts else "")


def table(rows: list[dict]) -> str:
    lines = ["| ZeRO | accum | batches | aten ops medgpt / ref (ratio) | host reads medgpt / ref | "
             "ms per step medgpt / ref (ratio) | targets met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = verdicts(r)
        missed = ", ".join(k for k, ok in met.items() if not ok)
        lines.append(f"| {r['stage']} | {r['accum']} | {'packed' if r['packed'] else 'unpacked'} | "
                     f"{r['ops']} / {r['ref_ops']} ({r['ops'] / r['ref_ops']:.2f}) | {_reads(r['reads'])} / "
                     f"{_reads(r['ref_reads'])} | {r['ms']:.1f} / {r['ref_ms']:.1f} ({r['ms'] / r['ref_ms']:.2f}) | "
                     f"{'missed: ' + missed if missed else 'all'} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="0,1,2", help="ZeRO stages, comma-separated")
    p.add_argument("--accums", default="1,4", help="gradient accumulation steps, comma-separated")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: what a GPU trains in (autocast on the reference); the width keeps it cheap on a CPU")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds of every variant, after one warm-up round (0: counts only, with --json)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line instead of the table")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.relative_to(REPO)}")
    args = p.parse_args()
    if args.rounds < 1 and not args.json:
        p.error("--rounds 0 times nothing (counts only): use it with --json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run([int(s) for s in args.stages.split(",")], [int(a) for a in args.accums.split(",")], args.precision,
               args.steps, args.rounds, device)
    if args.json:
        print(json.dumps(rows))
        return
    command = "python bench/host_overhead.py " + " ".join(sys.argv[1:])
    text = (f"\n## Host overhead per optimizer step, {datetime.date.today()}\n\n"
            f"{machine(device)}; `{command.strip()}`; model: GPT-2 124M's module tree at n_embd "
            f"{SHAPE['n_embd']}, {args.precision}, micro batch {MICRO_BATCH}, rows up to {SEQ_LEN} tokens; medians of "
            f"{args.rounds} x {args.steps} steps, interleaved.\n\n{table(rows)}\n")
    print(text)
    if args.write:
        with RESULTS.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
    exit_process(0)  # the process joined a gloo group: not a plain exit (medgpt/shutdown.py)
