"""Make DeepSpeed's CPU Adam kernels continue a resumed run bit for bit.

DeepSpeed's CPU Adam kernels (``FusedAdam`` on a CPU device and ``DeepSpeedCPUAdam``, which
ZeRO-Offload uses) keep the bias-correction powers beta1^t and beta2^t in the C++ optimizer object
as running float products, multiplied once per step. A fresh process that starts at step t+1
recomputes them with ``pow`` instead (``IncrementStep`` in ``csrc/includes/cpu_adam.h``), and pow
and the running product differ in the last bit: a resumed run drifts ~1e-7 from the uninterrupted
one. Replaying steps 1..t on a one-element dummy tensor rebuilds exactly the running product the
uninterrupted run has. (The CUDA kernels compute pow every step and need nothing.)
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    # FusedAdam counts on one parameter's state only (the group's last); the max covers both kernels.
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def replay_cpu_adam_steps(optimizer: Any) -> int:
    """Bring the kernel's running beta powers to the optimizer's loaded step. Call once, after
    loading a checkpoint and before the first step. Returns the number of steps replayed."""
    # FusedAdam's kernel is the accelerator's: the CPU one when DeepSpeed runs on the CPU accelerator.
    on_cpu = isinstance(optimizer, DeepSpeedCPUAdam) or (
        isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu")
    steps = _optimizer_step(optimizer) if on_cpu else 0
    if steps == 0:
        return 0
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    p, g, m, v = (torch.zeros(1) for _ in range(4))  # scratch: the update they get is thrown away
    for step in range(1, steps + 1):
        if isinstance(optimizer, DeepSpeedCPUAdam):
            optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                              group["weight_decay"], group["bias_correction"], p, g, m, v)
        else:
            optimizer.multi_tensor_adam(1, optimizer._dummy_overflow_buf, [[g], [p], [m], [v]], group["lr"],
                                        beta1, beta2, group["eps"], step, optimizer.adam_w_mode,
                                        int(group["bias_correction"]), group["weight_decay"])
    return steps
