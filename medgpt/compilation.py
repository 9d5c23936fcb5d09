"""--compile: the model's forward and backward through torch.compile (inductor), by DeepSpeed.

``engine.compile()`` (deepspeed/runtime/engine.py:5859-5947) compiles the wrapped module in place
(``nn.Module.compile``: the module, its parameter names and its checkpoints stay as they are) with
the accelerator's backend, inductor on CPU and CUDA. Tested at ZeRO-0 and ZeRO-2. At ZeRO-3 the
parameter gather/release hooks are ``torch.compiler.disable``-d (runtime/zero/parameter_offload.py
:358, 436), so dynamo breaks the graph around each module rather than tracing them.
DeepCompile (``"compile": {"deepcompile": true}`` in the JSON, which fuses
ZeRO's collectives into the graph) is DeepSpeed's to switch on: medgpt passes the JSON through.

``dynamic=True``: every batch has another padded length and another number of labelled positions
(``logits_to_keep``); compiled for fixed shapes, each new one would recompile until dynamo's
recompile limit and then run eagerly.
"""
from __future__ import annotations

import deepspeed


def compile_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Compile the engine's model for every batch shape. The first step of each mode (train,
    no_grad evaluation) pays the compilation: tens of seconds to minutes on a CPU."""
    engine.compile(compile_kwargs={"dynamic": True})
