"""Throughput, model FLOPs utilisation (MFU) and peak memory: the perf/ scalars of a training run.

MFU (PaLM, appendix B) = the FLOPs per second the model *needs* / the peak FLOPs per second of
the devices. "Needs" is the count of :func:`step_flops`: padding, attention over padding, LM-head
rows nobody reads and recomputation are work the hardware does but the model does not need, so
they count 0 and a wasteful step shows as a lower MFU. The peak is a datasheet value for known
GPUs, a timed matmul elsewhere, or ``--peak_tflops``.
"""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from medgpt.memory_plan import GiB
from medgpt.model import TORCH_DTYPES
from medgpt.model_shape import ModelShape


def step_flops(config: PretrainedConfig, sample_lengths: torch.Tensor | Sequence[int], answer_tokens: int) -> float:
    """FLOPs a forward + backward (3x the forward) over these samples needs.

    - 6 per body parameter per token (the 6N of Kaplan et al.; bias and LayerNorm parameters
      included, though they are not matmul weights: 0.1% of GPT-2 124M's count);
    - attention scores and their weighted sum, 12 * n_layer * n_embd * n per token of a sample of
      n tokens (PaLM / nanoGPT; the full n x n square although it is causal). Counted per sample,
      since a sample attends only to itself, padded or packed;
    - the LM head, 6 * n_embd * vocab, only at the ``answer_tokens`` positions that predict a
      labelled token: medgpt computes logits only around those (medgpt/loss.py), and the extra
      rows it computes when rows of a batch have their answers at different positions are not
      needed, so they are not counted.
    """
    lengths = torch.as_tensor(sample_lengths, dtype=torch.int64)
    return counted_flops(config, int(lengths.sum()), int((lengths * lengths).sum()), answer_tokens)


def counted_flops(config: PretrainedConfig, tokens: float, length_squares: float, answer_tokens: float) -> float:
    """:func:`step_flops` from the sums it needs: tokens, squared sample lengths, answer tokens."""
    shape = ModelShape.from_config(config)
    h = shape.n_embd
    return (6 * shape.body_params * tokens + 12 * shape.n_layer * h * length_squares
            + 6 * h * shape.vocab_size * answer_tokens)


def _tensor_core(half: float, tf32: float, fp32: float) -> dict[str, float]:
    return {"bf16": half, "fp16": half, "tf32": tf32, "fp32": fp32}


# Dense (no 2:4 sparsity) peak TFLOPS per GPU from NVIDIA's datasheets and architecture
# whitepapers; 16-bit values are tensor-core rates with fp32 accumulation (what torch uses; half
# the fp16-accumulate rate on GeForce cards). Matched in order against torch.cuda.get_device_name:
# a more specific name comes before a name it contains ("A100" before "A10", "L40" before "L4").
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", _tensor_core(835.5, 417.5, 60.0)),
    ("H100 PCIe", _tensor_core(756.5, 378.0, 51.2)),
    ("H100", _tensor_core(989.4, 494.7, 66.9)),  # SXM ("H100 80GB HBM3")
    ("H200 NVL", _tensor_core(835.5, 417.5, 60.0)),
    ("H200", _tensor_core(989.4, 494.7, 66.9)),  # SXM
    ("A100", _tensor_core(312.0, 156.0, 19.5)),  # SXM and PCIe alike
    ("A10G", _tensor_core(125.0, 62.5, 31.2)),  # AWS's A10 variant: no own datasheet, A10's values
    ("A10", _tensor_core(125.0, 62.5, 31.2)),
    ("L40S", _tensor_core(362.1, 183.0, 91.6)),
    ("L40", _tensor_core(181.0, 90.5, 90.5)),
    ("L4", _tensor_core(121.0, 60.0, 30.3)),
    ("RTX 4090", _tensor_core(165.2, 82.6, 82.6)),
    ("RTX 3090", _tensor_core(71.0, 35.6, 35.6)),
    # Volta and Turing: fp16 tensor cores only (no bf16, no tf32).
    ("V100-SXM", {"fp16": 125.0, "fp32": 15.7}),
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100S", {"fp16": 130.0, "fp32": 16.4}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]

def use_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 matmuls on TF32 tensor cores (Ampere and newer: ~8x the fp32 rate, 10-bit mantissa
    inputs, fp32 accumulation) or in full fp32. torch's default is full fp32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def matmul_dtype(device: torch.device, precision: str) -> str:
    """The table column of this run's matmuls: fp32 runs use tf32 tensor cores only if allowed."""
    if precision != "fp32" or device.type != "cuda":
        return precision
    setting = torch.backends.cuda.matmul.fp32_precision  # the new API; "none": the legacy one decides
    tf32 = setting == "tf32" if setting != "none" else torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def table_peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of a GPU by name, or None if the table does not know it (or its dtype)."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best rate of a few large square matmuls, on this device and with the threads torch uses.

    A measured, achievable peak, not a datasheet one: it is lower, so MFU against it reads higher.
    Own RNG, so the run's random streams are untouched. On a CPU, 512 x 512 reaches the rate of
    1024 x 1024 (fp32 0.073 against 0.057 TFLOPS, bf16 1.3 against 0.84 GFLOPS on one AMD EPYC
    thread) in 1/8 of the time: 1.5 s for bf16 without bf16 matrix units, not 29 s a rank.
    """
    size, repeats, trials = (8192, 10, 5) if device.type == "cuda" else (512, 2, 3)
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    a @ b  # warm-up: allocation, kernel choice
    best = math.inf
    for _ in range(trials):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    if device.type == "cuda":  # the measurement's buffers are not the run's memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return 2 * size**3 * repeats / best / 1e12


@dataclass(frozen=True)
class Peak:
    tflops: float  # per device
    source: str  # where the number comes from, for the start-up line


def device_peak(device: torch.device, precision: str, override: float) -> Peak:
    """This rank's peak: ``override`` (--peak_tflops) if > 0, else the GPU table, else measured."""
    if override > 0:
        return Peak(override, "--peak_tflops")
    dtype = matmul_dtype(device, precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = table_peak_tflops(name, dtype)
        if tflops is not None:
            return Peak(tflops, f"datasheet, {name}, {dtype}")
        measured = measure_peak_tflops(device, TORCH_DTYPES[precision])
        return Peak(measured, f"measured: {name} with {dtype} is not in the table, timed {dtype} matmuls")
    measured = measure_peak_tflops(device, TORCH_DTYPES[precision])
    return Peak(measured, f"measured: timed {dtype} matmuls on {torch.get_num_threads()} CPU thread(s)")


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak memory so far: allocated GPU memory, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class ThroughputWindow:
    """Training steps since the last log: only the time spent in them counts (evaluation,
    checkpointing and logging between steps do not). Counts are over all ranks."""
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # non-pad
    positions: int = 0  # padding included
    flops: float = 0.0

    def add(self, seconds: float, samples: int, tokens: int, positions: int, flops: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.positions += positions
        self.flops += flops

    def scalars(self, peak_tflops_total: float, peak_mem_per_rank: list[int]) -> dict[str, float]:
        """perf/ scalars; ``peak_tflops_total`` is the sum of the ranks' peaks."""
        tflops = self.flops / self.seconds / 1e12
        scalars = {"perf/tokens_per_s": self.tokens / self.seconds, "perf/samples_per_s": self.samples / self.seconds,
                   "perf/step_time_s": self.seconds / self.steps, "perf/tflops": tflops,
                   "perf/mfu": tflops / peak_tflops_total,
                   "perf/padding_fraction": 1 - self.tokens / self.positions}
        scalars.update({f"perf/peak_mem_gib/rank{r}": b / GiB for r, b in enumerate(peak_mem_per_rank)})
        return scalars


def console_summary(scalars: dict[str, float]) -> str:
    """One short line for the progress bar: tok/s 12.3k | mfu 41.2% | step 0.21s | mem 3.1 GiB."""
    tokens = scalars["perf/tokens_per_s"]
    tokens_text = (f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens / 1e3:.1f}k" if tokens >= 1e3
                   else f"{tokens:.0f}")
    memory = max(v for k, v in scalars.items() if k.startswith("perf/peak_mem_gib/"))
    return (f"tok/s {tokens_text} | mfu {scalars['perf/mfu']:.1%} | step {scalars['perf/step_time_s']:.2f}s | "
            f"mem {memory:.1f} GiB")
