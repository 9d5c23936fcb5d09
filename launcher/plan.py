"""Which ZeRO stage, offload and activation checkpointing fit a GPT-2 on your GPUs (no GPU needed).

    python launcher/plan.py --model gpt2-xl --gpus 8 --gpu_mem 80 --micro_batch_size 4 --seq_len 1024

Per GPU: parameters, gradients and optimizer states (DeepSpeed's accounting) and activations
(medgpt/memory_plan.py documents every formula); host memory per node with offload.
"""
import argparse

from medgpt.config import PRECISIONS
from medgpt.errors import CliParser, UserError, run_cli
from medgpt.memory_plan import (ATTENTIONS, GiB, PlanRow, Workload, load_shape, loads_pretrained, plan,
                                recommend)


def parse_args() -> argparse.Namespace:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a save_pretrained folder or a GPT2Config .json")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu_mem", type=float, default=80.0, help="GiB of memory per GPU")
    parser.add_argument("--reserve", type=float, default=4.0,
                        help="GiB per GPU kept out of the budget: CUDA context, NCCL and DeepSpeed buckets, "
                             "allocator fragmentation")
    parser.add_argument("--cpu_mem", type=float, default=None,
                        help="GiB of host memory per node; unset: host memory is not checked")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--attention", default="sdpa", choices=ATTENTIONS,
                        help="sdpa (transformers' default: no seq_len x seq_len scores kept) or eager")
    parser.add_argument("--dropout", type=float, default=0.1, help="as medgpt's --dropout (> 0 keeps masks)")
    parser.add_argument("--label_tokens", type=int, default=2,
                        help="labelled tokens per sample (2: the decision and EOS; ~60 with --long_answer)")
    return parser.parse_args()


def check(args: argparse.Namespace) -> None:
    for name in ("gpus", "nodes", "micro_batch_size", "seq_len", "label_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.reserve < args.gpu_mem:
        raise UserError(f"--reserve must be >= 0 and below --gpu_mem {args.gpu_mem} (got {args.reserve})")
    if args.cpu_mem is not None and args.cpu_mem <= 0:
        raise UserError(f"--cpu_mem must be > 0 GiB (got {args.cpu_mem})")


def gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def print_table(rows: list[PlanRow], gpu_budget: float, cpu_budget: float | None) -> None:
    print(f"{'ZeRO':>4} {'offload':>11} {'act.ckpt':>8} {'params':>8} {'grads':>8} {'optim':>8} "
          f"{'activ':>8} {'GPU':>8} {'CPU/node':>8}  fits")
    for row in rows:
        s = row.states
        print(f"{row.strategy.stage:>4} {row.strategy.offload:>11} {'yes' if row.checkpointing else 'no':>8} "
              f"{gib(s.params)} {gib(s.grads)} {gib(s.optimizer)} {gib(row.activations)} {gib(row.gpu)} "
              f"{gib(s.cpu)}  {'fits' if row.fits(gpu_budget, cpu_budget) else 'does not fit'}")


def main() -> None:
    args = parse_args()
    check(args)
    shape = load_shape(args.model)
    if args.seq_len > shape.n_positions:
        raise UserError(f"--seq_len {args.seq_len} exceeds the model's {shape.n_positions} positions")
    work = Workload(args.micro_batch_size, args.seq_len, args.precision, args.attention, args.dropout > 0,
                    args.label_tokens)
    rows = plan(shape, work, args.gpus, args.nodes, zero_init=loads_pretrained(args.model))
    gpu_budget = (args.gpu_mem - args.reserve) * GiB
    cpu_budget = None if args.cpu_mem is None else args.cpu_mem * GiB

    print(f"model {args.model}: {shape.num_params:,} parameters, {shape.layers} layers, hidden {shape.hidden}, "
          f"{shape.heads} heads; largest layer {shape.largest_layer_params:,}")
    print(f"{args.nodes} node(s) x {args.gpus} GPU(s) of {args.gpu_mem:g} GiB ({args.reserve:g} reserved)"
          + ("" if cpu_budget is None else f", {args.cpu_mem:g} GiB host memory per node"))
    print(f"micro batch {work.micro_batch} x seq_len {work.seq_len}, {work.precision}, {work.attention} attention; "
          "GiB per GPU (CPU: per node, DeepSpeed's estimate)\n")
    print_table(rows, gpu_budget, cpu_budget)
    best = recommend(rows, gpu_budget, cpu_budget)
    if best is None:
        print("\nnothing fits: lower --micro_batch_size (raise grad_accum to keep the batch) or --seq_len, "
              "or add GPUs")
    else:
        print(f"\nrecommended: ZeRO-{best.strategy.stage}, offload {best.strategy.offload}, activation "
              f"checkpointing {'on' if best.checkpointing else 'off'} ({best.strategy.ds_config}"
              f"{', --activation_checkpointing on' if best.checkpointing else ''}): the least sharding that fits")


if __name__ == "__main__":
    run_cli(main)
