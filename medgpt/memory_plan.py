"""Per-GPU memory of a GPT-2 training run: model states for ZeRO 0-3 (with and without offload)
plus activations (with and without activation checkpointing), and which layouts fit.

Pure arithmetic over the model's shape: nothing is built or allocated. Model states follow the
byte accounting of DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2 and
.stage3 ``estimate_zero{2,3}_model_states_mem_needs``), split into parameters, gradients and
optimizer states; the CPU memory of each layout is DeepSpeed's estimate itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgpt.config import ModelConfig
from medgpt.errors import UserError
from medgpt.model_shape import ModelShape

GiB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTIONS = ("sdpa", "eager")

# The OpenAI GPT-2 family as published on the Hub (config.json of each), so that planning by
# name works offline. Everything not listed is GPT2Config's default (vocab 50257, 1024 positions).
GPT2_SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def lora_params(shape: ModelShape, r: int, targets: list[str]) -> int:
    """Parameters of LoRA adapters of rank r (medgpt/lora.py) on the named Conv1D modules of every
    block: A (in -> r) and B (r -> out), no bias, r x (in + out) each. peft matches "c_proj" by
    name in the attention (h -> h) and the MLP (inner -> h) alike."""
    h, f = shape.n_embd, shape.mlp_width
    widths = {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (f, h)], "c_fc": [(h, f)]}
    return shape.n_layer * r * sum(i + o for target in targets for i, o in widths[target])
def load_shape(model: str) -> ModelShape:
    """A GPT-2 Hub name (offline: shapes above), a save_pretrained folder or a GPT2Config .json."""
    # Imported here: transformers pulls in torch (seconds), which launcher/plan.py --help does without.
    from transformers import GPT2Config

    name = model.removeprefix("openai-community/")
    if name in GPT2_SIZES:
        return ModelShape.from_config(GPT2Config(**GPT2_SIZES[name]))
    if not (Path(model).is_dir() or model.endswith(".json")):
        raise UserError(f"model '{model}' is neither a GPT-2 Hub name ({', '.join(GPT2_SIZES)}), nor a "
                        "save_pretrained folder, nor a GPT2Config .json file (e.g. configs/models/gpt2-124m.json)")
    if not Path(model).exists():
        raise UserError(f"model config file '{model}' does not exist")
    # Imported here: medgpt.model pulls in transformers' DeepSpeed integration, seconds a plan by
    # Hub name does without.
    from medgpt.model import check_model_folder, load_model_config

    if Path(model).is_dir():
        check_model_folder(model)
    return ModelShape.from_config(load_model_config(ModelConfig(model=model)))


def loads_pretrained(model: str) -> bool:
    """medgpt loads Hub names and folders inside zero.Init under ZeRO-3; a .json config is built
    whole on every rank (medgpt.model.build_model). This changes ZeRO-3's host memory."""
    return not model.endswith(".json")


@dataclass(frozen=True)
class Strategy:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only

    @property
    def offload(self) -> str:
        return "optim+param" if self.offload_param else "optim" if self.offload_optimizer else "none"

    @property
    def ds_config(self) -> str:
        """The shipped ds_configs/ file of this layout, or the nearest one and what to add to it."""
        shipped = {(0, "none"): "zero0.json", (1, "none"): "zero1.json", (2, "none"): "zero2.json",
                   (2, "optim"): "zero2_offload.json", (3, "none"): "zero3.json",
                   (3, "optim+param"): "zero3_offload.json"}
        name = shipped.get((self.stage, self.offload))
        return f"ds_configs/{name}" if name else \
            f"ds_configs/zero{self.stage}.json with zero_optimization.offload_optimizer.device=cpu"


# Offload needs ZeRO >= 1 (it moves the optimizer partition); parameter offload needs ZeRO-3.
STRATEGIES = (Strategy(0), Strategy(1), Strategy(1, True), Strategy(2), Strategy(2, True),
              Strategy(3), Strategy(3, True), Strategy(3, True, True))


@dataclass(frozen=True)
class ModelStates:
    """Bytes of one GPU (params, grads, optimizer) and of one node's host memory (cpu)."""
    params: int
    grads: int
    optimizer: int
    cpu: int

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(strategy: Strategy, shape: ModelShape, precision: str, gpus_per_node: int, nodes: int,
                 zero_init: bool, adapters: int = 0) -> ModelStates:
    """Model-state bytes per GPU, split as DeepSpeed's estimators count them.

    ``adapters`` > 0 (LoRA, :func:`lora_params`): the model's own parameters are frozen and kept
    as parameters only (p bytes each, sharded at ZeRO-3), and DeepSpeed gets only the adapters
    (medgpt.lora.trainable_parameters): gradients and optimizer states below count those alone.
    The CPU column stays DeepSpeed's full fine-tuning estimate (an upper bound: its estimators take
    one parameter count).

    DeepSpeed's comment in estimate_zero2_model_states_mem_needs: mixed precision holds 2 bytes of
    16-bit params + 18 = 2 (16-bit grads) + 4 (fp32 grads) + 4 (fp32 params) + 8 (Adam moments).
    Here p = bytes of the params the model computes with (2, or 4 for fp32), "optimizer" = fp32
    master params + Adam moments (12), and the fp32 gradient partition (4) counts as gradients.
    ZeRO-2 and ZeRO-3 reproduce DeepSpeed's per-GPU totals exactly (tests/test_plan.py); ZeRO-0
    and ZeRO-1 have no DeepSpeed estimator and are derived with the same accounting:
    - ZeRO-0: nothing sharded. DeepSpeed steps the plain optimizer on the model's own fp32 params
      and grads (no master copy, no second grads: 4 + 4 + 8); mixed precision is torch autocast
      (medgpt.ds_config), whose 16-bit copies of the weights live through the backward (+ p).
    - ZeRO-1: optimizer states and fp32 grads sharded; the 16-bit grads stay whole on each GPU.
    - ZeRO-2: 16-bit grads sharded too (DeepSpeed: 2 + 18/N).
    - ZeRO-3: params sharded too; DeepSpeed counts no separate 16-bit grad partition (grads are
      reduce-scattered into the fp32 one) and adds the largest layer gathered in 16-bit with its
      grads, 4 bytes per param of it in mixed precision (DeepSpeed: 18/N + 4 * largest).
    With ZeRO >= 1 DeepSpeed keeps an fp32 master partition even when the model is fp32 (it clones
    the partition), so only ZeRO-0 saves it. Optimizer offload moves master, moments and fp32
    grads to the CPU; ZeRO-2/3 then stream the 16-bit grads out bucket by bucket (DeepSpeed counts
    none on the GPU), ZeRO-1 keeps them whole until the step. Parameter offload leaves only the
    largest layer on the GPU. Buckets, CUDA context and fragmentation are not model states: the
    planner's reserve covers them.
    """
    p = PRECISION_BYTES[precision]
    n = gpus_per_node * nodes
    total, largest = shape.num_params + adapters, shape.largest_layer_params
    trained = adapters or total
    if strategy.stage == 0:
        # Trained weights, their grads and moments in fp32 in every precision (mixed precision is
        # autocast there: medgpt.ds_config), plus autocast's 16-bit copy of each trained weight, kept
        # for the backward; LoRA's frozen base stays in the precision trained with (medgpt.model).
        params = p * (total - trained) + (4 + p * (p < 4)) * trained
        grads, optimizer = 4 * trained, 8 * trained
    elif strategy.stage in (1, 2):
        on_gpu = not strategy.offload_optimizer
        keeps_16bit_grads = strategy.stage == 1 or on_gpu  # ZeRO-2 offload streams them out
        params = p * total
        grads = int((p * trained / (n if strategy.stage == 2 else 1)) * keeps_16bit_grads + on_gpu * 4 * trained / n)
        optimizer = int(on_gpu * 12 * trained / n)
    else:
        gathered = p * largest  # the largest layer's 16-bit params; as many bytes again for its grads
        on_gpu = not strategy.offload_optimizer
        params = gathered + int((not strategy.offload_param) * p * total / n)
        # With LoRA the largest layer (the token embedding) is frozen: no gradient is gathered for it.
        grads = gathered * (not adapters) + int(on_gpu * 4 * trained / n)
        optimizer = int(on_gpu * 12 * trained / n)
    return ModelStates(params, grads, optimizer, cpu_bytes(strategy, shape, gpus_per_node, nodes, zero_init))


def cpu_bytes(strategy: Strategy, shape: ModelShape, gpus_per_node: int, nodes: int, zero_init: bool) -> int:
    """Host memory per node: DeepSpeed's estimate (its default 1.5x buffer factor included): each
    process's fp32 copy of the model at load time, plus the offloaded optimizer. ZeRO-0/1 use the
    ZeRO-2 estimator: the same optimizer (stage_1_and_2) and the same loading."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if strategy.stage < 3:
        cpu, _ = estimate_zero2_model_states_mem_needs(shape.num_params, gpus_per_node, nodes,
                                                       cpu_offload=strategy.offload_optimizer)
    else:
        cpu, _, _ = estimate_zero3_model_states_mem_needs(
            shape.num_params, shape.largest_layer_params, gpus_per_node, nodes,
            cpu_offload=strategy.offload_optimizer, cpu_offload_params=strategy.offload_param,
            zero_init=zero_init)
    return cpu


@dataclass(frozen=True)
class Workload:
    """What one GPU runs per micro step."""
    micro_batch: int
    seq_len: int
    precision: str
    attention: str = "sdpa"  # transformers' default for GPT-2; "eager" materialises the scores
    dropout: bool = True  # medgpt's default dropout is 0.1: dropout keeps 1-byte masks
    label_tokens: int = 2  # labelled positions per sample: the decision word and EOS


def layer_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes one GPT2Block keeps for backward, following Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), section 4.1, which
    gives s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit (2-byte tensors, 1-byte dropout masks).

    Recounted for transformers' GPT-2 (measured on CPU with autograd's saved-tensor hooks, see
    tests/test_plan.py), in units of s*b*h values of p bytes, with inner = 4h:
    - eager attention, 28 values: LayerNorm inputs 2, c_attn input 1, q, k, v 3, attention
      c_proj input 1, c_fc input 1, MLP c_proj input 4, and 16 for "gelu_new", which transformers
      writes in Python so autograd keeps four 4h tensors where the paper counts one (+12 values).
      Plus the softmax, a*s*s*b values, and with dropout its 1-byte mask and the dropped
      probabilities: the paper's 5*a*s/h in 16-bit.
    - SDPA (transformers' default; flash / memory-efficient kernels on GPU), the same 28 values
      and no s x s term; its log-sum-exp (a*s*b fp32) is negligible. (With a KV cache alive in
      the forward, transformers' default use_cache=True, 30: medgpt trains with use_cache=False.)
    - dropout: two 1-byte masks of s*b*h (attention and MLP residual dropout; CUDA's masks are
      bool). The paper's 34 is 32 values + 2 masks: GPT-2 here keeps 24 more bytes per s*b*h.
    """
    s, b, h, a, p = work.seq_len, work.micro_batch, shape.n_embd, shape.n_head, PRECISION_BYTES[work.precision]
    # Widths of the kept tensors: 8 of width h, 5 of the MLP's width.
    kept_width = 8 * h + 5 * shape.mlp_width
    per_layer = s * b * (kept_width * p + 2 * h * work.dropout)
    if work.attention == "eager":
        per_layer += a * s * s * b * (p + work.dropout * (p + 1))
    return per_layer


def activation_bytes(shape: ModelShape, work: Workload, checkpointing: bool) -> int:
    """Activations of one micro batch at the peak of backward.

    Without checkpointing: every layer's activations. With full activation checkpointing
    (transformers' gradient_checkpointing, one checkpoint per GPT2Block): each block's input,
    s*b*h values, plus one block's activations recomputed during its backward.
    Outside the blocks: the embedding dropout mask and the final LayerNorm's input. The LM head
    runs only at labelled positions (medgpt.loss: logits_to_keep), at most b * label_tokens of
    them: p-byte logits, their fp32 log-softmax and its fp32 gradient, each vocab wide.
    """
    s, b, h, p = work.seq_len, work.micro_batch, shape.n_embd, PRECISION_BYTES[work.precision]
    layer = layer_activation_bytes(shape, work)
    blocks = shape.n_layer * s * b * h * p + layer if checkpointing else shape.n_layer * layer
    outside = s * b * h * (p + work.dropout)
    logits = min(b * work.label_tokens, b * s) * shape.vocab_size * (p + 8)
    return blocks + outside + logits


@dataclass(frozen=True)
class PlanRow:
    strategy: Strategy
    checkpointing: bool
    states: ModelStates
    activations: int

    @property
    def gpu(self) -> int:
        return self.states.gpu + self.activations

    def fits(self, gpu_budget: float, cpu_budget: float | None) -> bool:
        return self.gpu <= gpu_budget and (cpu_budget is None or self.states.cpu <= cpu_budget)

    @property
    def speed_rank(self) -> tuple[int, bool, int]:
        """Fastest first: offload (bound by PCIe and the CPU's Adam) costs most, then recomputation
        (about a third more compute), then sharding (more communication, the cheapest)."""
        offload_level = self.strategy.offload_optimizer + self.strategy.offload_param
        return offload_level, self.checkpointing, self.strategy.stage


def plan(shape: ModelShape, work: Workload, gpus_per_node: int, nodes: int, zero_init: bool,
         adapters: int = 0) -> list[PlanRow]:
    """Every ZeRO layout x activation checkpointing off/on (``adapters``: see model_states)."""
    return [PlanRow(strategy, checkpointing,
                    model_states(strategy, shape, work.precision, gpus_per_node, nodes, zero_init, adapters),
                    activation_bytes(shape, work, checkpointing))
            for strategy in STRATEGIES for checkpointing in (False, True)]


def recommend(rows: list[PlanRow], gpu_budget: float, cpu_budget: float | None) -> PlanRow | None:
    """The fastest layout that fits, or None."""
    fitting = [row for row in rows if row.fits(gpu_budget, cpu_budget)]
    return min(fitting, key=lambda row: row.speed_rank, default=None)
