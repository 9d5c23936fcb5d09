"""--compile: the model's forward and backward through torch.compile (inductor), by DeepSpeed.

``engine.compile()`` (deepspeed/runtime/engine.py:5859-5947) compiles the wrapped module in place
(``nn.Module.compile``: the module, its parameter names and its checkpoints stay as they are) with
the accelerator's backend, inductor on CPU and CUDA. Tested at ZeRO-0 and ZeRO-2. At ZeRO-3 the
parameter gather/release hooks are ``torch.compiler.disable``-d (runtime/zero/parameter_offload.py
:358, 436), so dynamo breaks the graph around each module rather than tracing them.
DeepCompile (``"compile": {"deepcompile": true}`` in the JSON, which fuses
ZeRO's collectives into the graph) is DeepSpeed's to switch on: medgpt passes the JSON through.

Shapes: with --compile every training row is padded to seq_len (medgpt.startup.build_data), so
the body of the model sees one shape. What still varies is the number of positions the LM head
runs at (``logits_to_keep``, the batch's labelled positions: medgpt/loss.py). torch's automatic
dynamic shapes (the default, ``dynamic=None``) compile the first batch for its exact shapes, and
on the first batch with another count compile once more with that dimension symbolic; nothing
recompiles after that. (``dynamic=True`` would make every dimension symbolic, the batch and the
width too, and give up the static kernels.) Evaluation batches keep their own widths: the first
evaluation compiles its no_grad graph the same way. The forward and loss compile as one graph with
no break, packed or not (tests/test_loss.py): the attention takes no mask built from device values
(medgpt/attention.py).
"""
from __future__ import annotations

import deepspeed


def compile_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Compile the engine's model. The first step of each mode (train, no_grad evaluation) pays
    the compilation: tens of seconds to minutes on a CPU."""
    engine.compile()
