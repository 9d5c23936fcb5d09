"""The DeepSpeed JSON: read it, fill its "auto" values from the training config (as the Hugging
Face integration does), and refuse values that contradict the training config."""
from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgpt.config import Config
from medgpt.errors import UserError

# DeepSpeed prints its own progress every steps_per_print steps; medgpt logs instead.
QUIET_STEPS_PER_PRINT = 10**9
ZERO_STAGES = (0, 1, 2, 3)
REDUCE_BUCKET = 25_000_000  # elements: 100 MB in fp32, several of GPT-2's blocks, more than any one matrix


def load_ds_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config '{path}' does not exist; pass --ds_config "
                        "(e.g. ds_configs/zero2.json)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config '{path}' is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"DeepSpeed config '{path}' must be a JSON object")
    _check_zero_stage(raw, path)
    return raw


def _check_zero_stage(raw: dict[str, Any], path: str) -> None:
    """DeepSpeed itself only rejects an unknown stage inside deepspeed.initialize (its pydantic
    ZeroStageEnum field, deepspeed/runtime/zero/config.py:95), after the run has started writing."""
    zero = raw.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    # bool is an int in Python, but "stage": true is not a stage.
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise UserError(f"DeepSpeed config '{path}': zero_optimization.stage {json.dumps(stage)} is not a ZeRO "
                        f"stage; use one of {', '.join(map(str, ZERO_STAGES))} (e.g. ds_configs/zero2.json)")


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(ds: dict[str, Any], problems: list[str], path: str, value: Any, source: str) -> None:
    """Set ds[path] to value if missing or "auto"; otherwise it must already agree."""
    *parents, leaf = path.split(".")
    node = ds
    for key in parents:
        node = node.setdefault(key, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif not _same(current, value):
        problems.append(f"ds_config {path}={json.dumps(current)} disagrees with {source}={json.dumps(value)}; "
                        f"make them equal or write \"auto\" in the JSON")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _autos_left(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos_left(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def offloads_optimizer(zero: dict[str, Any]) -> bool:
    return zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def _default_optimizer_kernel(optimizer: dict[str, Any], zero: dict[str, Any]) -> None:
    """Adam that needs no build step, unless the JSON says otherwise.

    For "Adam"/"AdamW" DeepSpeed builds its own FusedAdam, a CUDA extension JIT-compiled at
    initialize that needs nvcc and CUDA_HOME on every node, or fails on all ranks
    (runtime/engine.py:2378-2409 get_optimizer_configuration, ops/adam/fused_adam.py). torch's
    AdamW needs nothing. Fused (torch's kernel for CUDA and, since torch 2.4, CPU tensors) it is
    one kernel per step like FusedAdam, and it keeps each parameter's step count on the
    parameter's device: the foreach and per-tensor versions keep it on the host and read it back
    for the bias correction, once per parameter tensor per step (torch/optim/adamw.py,
    ``_get_value``). ZeRO-Offload keeps DeepSpeedCPUAdam (required there: engine.py:2342), built
    once with the host's compiler.
    """
    if optimizer.get("type", "").lower() not in ("adam", "adamw") or offloads_optimizer(zero):
        return
    params = optimizer.setdefault("params", {})
    if params.setdefault("torch_adam", True):
        params.setdefault("fused", True)


def _fill_precision(ds: dict[str, Any], precision: str, stage: int, fill: Callable[[str, Any, str], None],
                    problems: list[str]) -> None:
    """bf16/fp16 through DeepSpeed's optimizer wrappers at ZeRO >= 1. At ZeRO-0 those wrappers
    are FP16_UnfusedOptimizer (runtime/engine.py _configure_fp16_optimizer, for bf16 too), which
    casts every parameter tensor and checks each for overflow with a read of the device, every
    step. So bf16 at ZeRO-0 is DeepSpeed's torch autocast over fp32 weights (engine.py
    autocast_if_enabled): no wrapper, fp32 gradients and master weights, and fp16 is refused."""
    if stage > 0 or precision == "fp32":
        fill("bf16.enabled", precision == "bf16", f"precision={precision}")
        fill("fp16.enabled", precision == "fp16", f"precision={precision}")
        return
    if precision == "fp16":
        problems.append("precision fp16 at ZeRO-0: DeepSpeed's fp16 wrapper there (FP16_UnfusedOptimizer) casts and "
                        "checks every parameter tensor on the host each step; use ZeRO-1 (e.g. --ds_config "
                        "ds_configs/zero1.json: fp16 with the optimizer state in one flat buffer) or --precision bf16")
        return
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") is True:
            problems.append(f"ds_config {key}.enabled=true at ZeRO-0 wraps the optimizer in DeepSpeed's "
                            "FP16_UnfusedOptimizer (a cast and an overflow check per parameter tensor each step); "
                            "medgpt trains bf16 at ZeRO-0 as torch autocast over fp32 weights: write \"auto\" there")
        ds.setdefault(key, {})["enabled"] = False
    ds.setdefault("torch_autocast", {}).update({"enabled": True, "dtype": "bfloat16"})


def resolve_ds_config(raw: dict[str, Any], cfg: Config, world_size: int, total_steps: int,
                      hidden_size: int, on_gpu: bool, grad_accum: int | None = None) -> dict[str, Any]:
    """A complete DeepSpeed config for this run. Every problem is reported at once. ``grad_accum``:
    the accumulation the run uses, when a resume changed cfg's (medgpt/resume.py)."""
    t, o = cfg.train, cfg.optim
    accum = grad_accum or t.grad_accum
    if t.precision == "fp16" and not on_gpu:
        raise UserError("precision fp16 needs a GPU (DeepSpeed's fp16 loss scaling is CUDA-only); "
                        "use --precision bf16 or fp32 on CPU")
    ds = copy.deepcopy(raw)
    problems: list[str] = []
    fill = functools.partial(_fill, ds, problems)

    fill("train_micro_batch_size_per_gpu", t.micro_batch_size, "micro_batch_size")
    fill("gradient_accumulation_steps", accum, "grad_accum")
    fill("train_batch_size", t.micro_batch_size * accum * world_size,
         f"micro_batch_size x grad_accum x world size ({t.micro_batch_size} x {accum} x {world_size})")
    fill("gradient_clipping", o.grad_clip, "grad_clip")
    _fill_precision(ds, t.precision, zero_stage(ds), fill, problems)

    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    fill("optimizer.params.lr", o.lr, "lr")
    fill("optimizer.params.weight_decay", o.weight_decay, "weight_decay")
    fill("optimizer.params.betas", [o.adam_beta1, o.adam_beta2], "adam_beta1/adam_beta2")
    fill("optimizer.params.eps", o.adam_eps, "adam_eps")

    # No "scheduler" section: medgpt's own warmup + cosine (medgpt/lr_schedule.py) is used.
    sched = ds.get("scheduler", {}).get("type")
    if sched == "WarmupCosineLR":
        fill("scheduler.params.total_num_steps", total_steps, "the run's total steps")
        fill("scheduler.params.warmup_num_steps", max(1, o.warmup_steps), "warmup_steps (at least 1)")
        fill("scheduler.params.cos_min_ratio", o.min_lr_ratio, "min_lr_ratio")
        fill("scheduler.params.warmup_min_ratio", 0.0, "warmup from 0")
    elif sched in ("WarmupLR", "WarmupDecayLR"):
        fill("scheduler.params.warmup_max_lr", o.lr, "lr")
        fill("scheduler.params.warmup_min_lr", 0.0, "warmup from 0")
        fill("scheduler.params.warmup_num_steps", o.warmup_steps, "warmup_steps")
        if sched == "WarmupDecayLR":
            fill("scheduler.params.total_num_steps", total_steps, "the run's total steps")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    _default_optimizer_kernel(ds["optimizer"], zero)
    if t.precision == "bf16" and zero_stage(ds) > 0:
        # bf16 gradients summed in bf16 lose precision over micro-steps and ranks: accumulate in
        # fp32 -- ZeRO-1 through BF16_Optimizer (runtime/engine.py:2305), ZeRO-2/3 in their own
        # buffers (runtime/zero/stage_1_and_2.py:397, stage3.py:239). ZeRO-0 has fp32 weights and
        # gradients anyway (_fill_precision).
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        # bf16 has fp32's range: a gradient that is not finite is a diverged run, which the training
        # step stops at once (medgpt.train.check_step). DeepSpeed's check, on by default
        # (runtime/precision_config.py check_grad_overflow), tests every parameter tensor and reads
        # the result back at ZeRO-2 (runtime/zero/stage_1_and_2.py has_overflow_serial, :3029, :3043).
        ds["bf16"].setdefault("check_grad_overflow", False)
    if zero_stage(ds) == 0:
        # DeepSpeed clips fp32 gradients at ZeRO-0 one parameter tensor at a time (a norm and a
        # multiply each: runtime/utils.py clip_grad_norm_, called from engine.py _take_model_step);
        # the training step clips them itself with torch's foreach kernels instead
        # (medgpt.train.clip_gradients), to the same gradient_clipping.
        ds["gradient_clipping"] = 0.0
    # Gradients are reduced bucket by bucket. The Hugging Face integration's n_embd^2 makes a bucket of
    # one weight matrix (a Python hook and a collective each); REDUCE_BUCKET holds several blocks.
    for key, value in (("reduce_bucket_size", REDUCE_BUCKET),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value

    ds.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    # DeepSpeed's throughput timer, on by default (deepspeed/utils/config.py, DeepSpeedThroughputTimerConfig),
    # synchronizes the device when it starts (the forward pre-hook) and stops (engine.step), once per
    # micro-batch (deepspeed/utils/timer.py:231-256): a host stall each time on a GPU, for a number
    # medgpt never reads (it times its own steps: medgpt/throughput.py). A user's own setting is kept.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    leftover = _autos_left(ds)
    if leftover:
        problems.append(f"ds_config has \"auto\" where medgpt has no value: {', '.join(leftover)}; "
                        "write a number there")
    if problems:
        raise UserError(*problems)
    return ds
