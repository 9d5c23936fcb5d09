"""The GPU path end to end: bf16 and fp16 x ZeRO 0-3, a few optimizer steps each, then the export
evaluated on one device; one table (pass/fail, useful tokens/s, MFU, peak memory).

    python bench/gpu_check.py                                   # GPT-2 124M shape, every GPU
    python bench/gpu_check.py --precisions bf16 --stages 2,3 --steps 10 --write

Runs on a machine with a CUDA build of torch and transformers; DeepSpeed must be installed too
(README: "On a GPU machine"). Each cell is a real ``torchrun launcher/train.py`` job (random-init
model, the real tokenizer and PubMedQA copy), followed by ``launcher/evaluate.py`` on its export
with ``--device cuda``. A cell passes when training exits 0, the test scoring and the export are
written, and the export scores the dev fold on one GPU. Numbers are read from the run's own
TensorBoard log (its last perf/ window: steps after the first) -- nothing here is timed twice.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "RESULTS.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "configs" / "models" / "gpt2-124m.json"),
                   help="Hub name, save_pretrained folder or GPT2Config .json")
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--data", default=str(SHARED / "pubmedqa" / "ori_pqal.json"))
    p.add_argument("--precisions", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages (ds_configs/zero<N>.json)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per cell (>= 2)")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--nproc", type=int, default=0, help="ranks (0: one per GPU)")
    p.add_argument("--output_dir", type=Path, default=REPO / "runs" / "gpu-check")
    p.add_argument("--timeout", type=float, default=900, help="seconds one cell may take")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.relative_to(REPO)}")
    return p.parse_args(argv)


def check_machine() -> None:
    problems = []
    if not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda or 'none'})")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed is not installed: pip install --no-build-isolation deepspeed (README, "
                        "'On a GPU machine')")
    if problems:
        sys.exit("gpu_check: " + "; ".join(problems))


def last_scalars(run: Path) -> dict[str, float]:
    """The last value of every scalar of a run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def run_cell(args: argparse.Namespace, precision: str, stage: int, nproc: int) -> dict[str, object]:
    out = args.output_dir / f"{precision}-zero{stage}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # log_every steps-1: one perf window over steps 2..N (step 1 holds the start-up costs).
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
             str(29500 + stage + 10 * len(precision)), str(REPO / "launcher" / "train.py"),
             "--model", args.model, "--tokenizer", args.tokenizer, "--data", args.data, "--output_dir", str(out),
             "--ds_config", str(REPO / "ds_configs" / f"zero{stage}.json"), "--precision", precision,
             "--device", "cuda", "--max_steps", str(args.steps), "--log_every", str(args.steps - 1),
             "--micro_batch_size", str(args.micro_batch_size), "--seq_len", str(args.seq_len), "--eval_every", "0",
             "--resume", "none", "--dropout", "0.0", "--lr", "1e-4", "--warmup_steps", "1"]
    start = time.perf_counter()
    proc = subprocess.run(train, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    cell: dict[str, object] = {"precision": precision, "stage": stage, "train_rc": proc.returncode,
                               "seconds": round(time.perf_counter() - start)}
    (args.output_dir / f"{precision}-zero{stage}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        cell["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][-200:]
        return cell
    scalars = last_scalars(out)
    cell.update(tokens_per_s=scalars["perf/tokens_per_s"], mfu=scalars["perf/mfu"],
                peak_mem_gib=max(v for k, v in scalars.items() if k.startswith("perf/peak_mem_gib/")),
                skipped_steps=scalars.get("train/skipped_steps", 0.0),
                test_accuracy=json.loads((out / "test_metrics.json").read_text())["accuracy"])
    evaluate = [sys.executable, str(REPO / "launcher" / "evaluate.py"), "--model", str(out / "export"), "--split",
                "dev", "--data", args.data, "--device", "cuda", "--seq_len", str(args.seq_len),
                "--output_dir", str(out / "eval-dev")]
    proc = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    cell["eval_rc"] = proc.returncode
    if proc.returncode != 0:
        cell["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][-200:]
    return cell


def table(cells: list[dict[str, object]]) -> str:
    rows = ["| precision | ZeRO | result | tokens/s | MFU | peak mem (GiB) | skipped | s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        ok = c["train_rc"] == 0 and c.get("eval_rc") == 0
        result = "pass" if ok else f"FAIL ({c.get('error', '')})"
        numbers = (f"{c['tokens_per_s']:,.0f} | {c['mfu']:.1%} | {c['peak_mem_gib']:.1f} | {c['skipped_steps']:.0f}"
                   if "mfu" in c else "- | - | - | -")
        rows.append(f"| {c['precision']} | {c['stage']} | {result} | {numbers} | {c['seconds']} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_machine()
    nproc = args.nproc or torch.cuda.device_count()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for precision in args.precisions.split(","):
        for stage in args.stages.split(","):
            cells.append(run_cell(args, precision, int(stage), nproc))
            print(table(cells[-1:]).splitlines()[-1], flush=True)
            (args.output_dir / "cells.json").write_text(json.dumps(cells, indent=2))  # kept if stopped later
    header = (f"{datetime.date.today()}, {nproc} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"model {Path(args.model).name}, seq_len {args.seq_len}, micro batch {args.micro_batch_size}, "
              f"{args.steps} steps: `python bench/gpu_check.py {' '.join(argv)}`")
    report = f"{header}\n\n{table(cells)}\n"
    print(report)
    if args.write:
        with RESULTS.open("a") as f:
            f.write(f"\n## GPU check\n\n{report}")
    return 0 if all(c["train_rc"] == 0 and c.get("eval_rc") == 0 for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
