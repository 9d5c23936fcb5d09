"""Which ZeRO stage, offload and activation checkpointing fit a GPT-2 on your GPUs (no GPU needed).

    python launcher/plan.py --model gpt2-xl --gpus 8 --gpu_mem 80 --micro_batch_size 4 --seq_len 1024

Per GPU: parameters, gradients and optimizer states (DeepSpeed's accounting) and activations
(medgpt/memory_plan.py documents every formula); host memory per node with offload.
"""
import sys

from medgpt.cli import parse_request, request_parser
from medgpt.commands import PlanRequest
from medgpt.config import ModelConfig
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, UserError, run_cli
from medgpt.memory_plan import GiB, PlanRow, Workload, load_shape, loads_pretrained, lora_params, plan, recommend


def parser() -> CliParser:
    return request_parser(PlanRequest, __doc__)


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


def main(argv: list[str]) -> None:
    request = parse_request(PlanRequest, parser(), argv)
    quiet_libraries(request.verbose)
    shape = load_shape(request.model)
    if request.seq_len > shape.n_positions:
        raise UserError(f"--seq_len {request.seq_len} exceeds the model's {shape.n_positions} positions")
    work = Workload(request.micro_batch_size, request.seq_len, request.precision, request.attention,
                    request.dropout > 0, request.label_tokens)
    adapters = lora_params(shape, request.lora_r, ModelConfig(lora_targets=request.lora_targets).lora_modules)
    rows = plan(shape, work, request.gpus, request.nodes, zero_init=loads_pretrained(request.model), adapters=adapters)
    gpu_budget = (request.gpu_mem - request.reserve) * GiB
    cpu_budget = None if request.cpu_mem is None else request.cpu_mem * GiB

    print(f"model {request.model}: {shape.num_params:,} parameters, {shape.n_layer} layers, "
          f"hidden {shape.n_embd}, {shape.n_head} heads; largest layer {shape.largest_layer_params:,}")
    if adapters:
        print(f"LoRA r {request.lora_r} on {request.lora_targets}: {adapters:,} trainable parameters "
              f"({adapters / shape.num_params:.2%}); the model is frozen: no gradients or optimizer states for it")
    print(f"{request.nodes} node(s) x {request.gpus} GPU(s) of {request.gpu_mem:g} GiB "
          f"({request.reserve:g} reserved)"
          + ("" if cpu_budget is None else f", {request.cpu_mem:g} GiB host memory per node"))
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
    run_cli(lambda: main(sys.argv[1:]))
