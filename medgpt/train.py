"""The training loop, top to bottom: config -> data -> model -> engine -> loop -> metrics.

Loss normalisation: the loss of one optimizer step is the summed cross-entropy of every answer
token in the global batch (all ranks, all accumulation micro-steps) divided by the number of
those tokens, so a step means the same thing whatever the world size or accumulation.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import yaml
from transformers import PreTrainedTokenizerBase

from medgpt.checkpoint import TrainState, describe_history, load_checkpoint, mark_finished
from medgpt.config import Config, TrainConfig
from medgpt.data import COUNTS, to_device
from medgpt.distributed import Dist, exit_on_collective_timeout, init_distributed
from medgpt.errors import PREEMPTED_EXIT, TrainingDiverged
from medgpt.export import export_checkpoint
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.metrics import score_line
from medgpt.preemption import StopRequest, watch_deepspeed_launcher
from medgpt.progress import Progress
from medgpt.provenance import run_provenance
from medgpt.pubmedqa import Record
from medgpt.resume import ResumePlan, best_checkpoint, plan_resume
from medgpt.run_lock import lock_output_dir
from medgpt.scoring import cut_contexts_line, evaluate_records, metric_scalars, write_results
from medgpt.startup import (
    Data,
    Engine,
    build_data,
    build_engine,
    check_inputs,
    peak_tflops_total,
    resolve_run_ds_config,
    write_run_files,
)
from medgpt.throughput import ThroughputWindow, console_summary, counted_flops, peak_memory_bytes
from medgpt.tracking import MetricsLogger

BEST_FILE = "best.json"  # in output_dir: the --select_best checkpoint, its step and dev score


@dataclass
class StepStats:
    """One optimizer step, summed over all ranks."""
    loss: float  # mean answer-token loss of the global batch
    grad_norm: float | None  # before clipping; None where DeepSpeed computes none
    applied: bool  # False: DeepSpeed skipped the update (fp16 loss-scale overflow)
    stop: bool  # some rank was asked to stop (a signal): every rank sees the same
    answer_tokens: int  # tokens carrying loss
    tokens: int  # non-pad tokens
    positions: int  # token positions computed, padding included (rows x width)
    flops: float  # model FLOPs the step needs (medgpt.throughput.counted_flops)
    samples: int  # questions (a packed row holds several)
    peak_memory: list[int]  # bytes, per rank


def train_step(engine: deepspeed.DeepSpeedEngine, micro_batches: list[dict[str, torch.Tensor]], dist: Dist,
               stop_requested: bool, grad_clip: float) -> StepStats:
    """One optimizer step over this rank's micro-batches, gradients clipped to ``grad_clip``.

    Two small collectives and one read of the device per step, whatever the accumulation: the
    global counts before the first backward (the loss scale needs them; counted by the collate
    functions on the host, summed on the device without waiting), and after the step the loss,
    the stop flag and each rank's peak memory, read back once. Every step, not every logged one:
    a non-finite loss stops the run at once, and all ranks must agree to stop at the same step.
    """
    counts = dist.sum_(dist.tensor(sum(b["counts"] for b in micro_batches)))
    # DeepSpeed averages gradients over ranks; multiplying by the world size turns that average
    # back into the sum over the global batch, which we divide by its answer-token count.
    scale = dist.world_size / counts[COUNTS.index("answer_tokens")].clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        loss = label_loss_sum(engine, to_device(batch, dist.device))
        engine.backward(loss * scale.to(loss.dtype), scale_wrt_gas=False)
        if i == len(micro_batches) - 1:
            grad_norm = clip_gradients(engine, grad_clip)
        engine.step()  # the optimizer steps only at the accumulation boundary
        loss_sum += loss.detach()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    memory = [0.0] * dist.world_size  # each rank fills its own slot: the sum gathers them all
    memory[dist.rank] = float(peak_memory_bytes(dist.device))
    ends = dist.tensor([0.0, float(stop_requested), *memory])
    ends[0] = loss_sum
    dist.sum_(ends)
    norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float64, device=dist.device)
    values = torch.cat([counts, ends, norm.reshape(1)]).tolist()  # the step's one read of the device
    answer_tokens, tokens, positions, samples, length_squares = values[:len(COUNTS)]
    loss, stop, *peaks, norm_value = values[len(COUNTS):]
    return StepStats(loss=loss / max(answer_tokens, 1.0), grad_norm=None if grad_norm is None else norm_value,
                     applied=engine.was_step_applied(), stop=stop > 0, answer_tokens=int(answer_tokens),
                     tokens=int(tokens), positions=int(positions),
                     flops=counted_flops(engine.module.config, tokens, length_squares, answer_tokens),
                     samples=int(samples), peak_memory=[int(p) for p in peaks])


def clip_gradients(engine: deepspeed.DeepSpeedEngine, max_norm: float) -> torch.Tensor | None:
    """ZeRO-0: clip the gradients to ``max_norm`` (0: leave them) with torch's foreach kernels and
    return their norm before clipping. DeepSpeed's own clipping there, one parameter tensor at a
    time, is off (medgpt.ds_config) and keeps no norm. None at ZeRO >= 1, where DeepSpeed's optimizer
    clips and reports the norm. Called after the last backward, when the gradients are all-reduced."""
    if engine.zero_optimization_stage() > 0:
        return None
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


@torch.no_grad()
def evaluate_loss(engine: deepspeed.DeepSpeedEngine, loader: torch.utils.data.DataLoader, dist: Dist) -> float:
    """Mean answer-token loss over a held-out set (every rank takes part: ZeRO-3 needs it)."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    count = 0
    for batch in loader:
        loss_sum += label_loss_sum(engine, to_device(batch, dist.device))
        count += count_label_tokens(batch["labels"])
    engine.train()
    totals = dist.tensor([0.0, count])
    totals[0] = loss_sum
    total, n = dist.sum_(totals).tolist()
    return total / max(n, 1.0)


@dataclass
class SkipCount:
    """Steps whose update DeepSpeed skipped (an fp16 loss-scale overflow)."""
    total: int = 0
    in_a_row: int = 0

    def add(self, applied: bool) -> None:
        self.total += not applied
        self.in_a_row = 0 if applied else self.in_a_row + 1


def check_step(stats: StepStats, step: int, precision: str, skips: SkipCount, max_skipped: int,
               last_checkpoint: Path | None, lr: float) -> None:
    """Stop a run that trains garbage: a non-finite loss or gradient norm, or (fp16) a loss
    scale that overflows step after step. Every rank decides alike: the values are global."""
    kept = (f"the last good checkpoint, {last_checkpoint}, is kept as latest (--resume auto continues from it)"
            if last_checkpoint else "no checkpoint was saved before it (--save_every N keeps some)")
    finite = math.isfinite(stats.loss) and (stats.grad_norm is None or math.isfinite(stats.grad_norm))
    overflow_skipped = precision == "fp16" and not stats.applied  # normal: DeepSpeed lowers the loss scale
    if not finite and not overflow_skipped:
        norm = "not computed" if stats.grad_norm is None else f"{stats.grad_norm:.4g}"
        raise TrainingDiverged(f"training diverged at step {step}: loss {stats.loss:.4g}, gradient norm {norm} "
                               f"at lr {lr:.3g}. A learning rate too high is the usual cause (lower --lr or raise "
                               f"--warmup_steps), else a broken sample in the data; {kept}. Nothing was exported.")
    if skips.in_a_row >= max_skipped:
        raise TrainingDiverged(f"fp16 loss scaling skipped {skips.in_a_row} steps in a row up to step {step}: the "
                               f"gradients overflow at every loss scale. Use --precision bf16, lower --lr, or raise "
                               f"--max_skipped_steps; {kept}. Nothing was exported.")


def _score_test(engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase, records: list[Record],
                cfg: Config, dist: Dist, logger: MetricsLogger | None, step: int, final: Path) -> None:
    """The official test set, once, with the final weights (all ranks score; rank 0 writes).
    Recorded in the final checkpoint last: a crash before that leaves it to the rerun (a crash
    between the TensorBoard flush and the record, a few milliseconds, would log it twice)."""
    if dist.is_main:
        print(f"medgpt: scoring the {len(records)} test questions", flush=True)
    test = evaluate_records(engine, tokenizer, records, dist, cfg.data.seq_len, cfg.train.eval_batch_size,
                            progress=dist.is_main and sys.stderr.isatty())  # a bar in a file: a line per redraw
    if dist.is_main:
        write_results(Path(cfg.train.output_dir), records, test, test.metrics, prefix="test_")
        if line := cut_contexts_line(test.metrics, len(records)):
            print(line, flush=True)
        logger.log(step, metric_scalars(test, "test"))
        logger.close()
        mark_finished(final, "test")
        print(f"test: {score_line(test.metrics)}")


def _export_final(final: Path, output_dir: Path, dist: Dist) -> None:
    """Rank 0 exports alone, after the process group is gone: no rank waits on it in a collective."""
    torch.distributed.destroy_process_group()
    if dist.is_main:
        export = output_dir / "export"
        shutil.rmtree(export, ignore_errors=True)  # medgpt's own output, replaced by the newer weights
        export_checkpoint(final, export)
        mark_finished(final, "export")
        print(f"medgpt: exported {export}", flush=True)


def _step_batches(data: Data, state: TrainState, grad_accum: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each optimizer step's micro-batches, from the state's position on, epoch after epoch (the
    loop advances the state; a new epoch reshuffles)."""
    while True:
        data.sampler.set_epoch(state.epoch, state.consumed)
        epoch, batches = state.epoch, iter(data.train)
        while state.epoch == epoch:
            yield [next(batches) for _ in range(grad_accum)]


def _log_step(logger: MetricsLogger | None, bar: Progress, step: int, epoch: float, stats: StepStats, lr: float,
              perf: dict[str, float], engine: deepspeed.DeepSpeedEngine, skips: SkipCount) -> None:
    scalars = {"train/loss": stats.loss, "train/lr": lr, "train/epoch": epoch, **perf}
    if stats.grad_norm is not None:
        scalars["train/grad_norm"] = stats.grad_norm
    if engine.fp16_enabled():
        # loss_scale: a property of every wrapper DeepSpeed puts around an fp16 optimizer
        # (runtime/fp16/fused_optimizer.py:542, unfused_optimizer.py:333, zero/stage_1_and_2.py
        # :3322, zero/stage3.py:3361); cur_scale exists only on the ZeRO ones.
        scalars["train/loss_scale"] = float(engine.optimizer.loss_scale)
        scalars["train/skipped_steps"] = skips.total
    if logger:
        logger.log(step, scalars)
        bar.status(step, f"loss {stats.loss:.4f} | lr {lr:.2e} | {console_summary(perf)}")


def _evaluate_dev(run: Engine, tokenizer: PreTrainedTokenizerBase, data: Data, cfg: Config, dist: Dist,
                  logger: MetricsLogger | None, bar: Progress) -> None:
    """Held-out loss and answer accuracy / macro-F1 on the dev fold (log-likelihood scoring; all
    ranks), and with --select_best a checkpoint whenever the selected score improves."""
    engine, state, t = run.engine, run.state, cfg.train
    eval_loss = evaluate_loss(engine, data.dev, dist)
    dev = evaluate_records(engine, tokenizer, data.dev_records, dist, cfg.data.seq_len, t.eval_batch_size)
    if logger:
        logger.log(state.step, {"eval/loss": eval_loss, **metric_scalars(dev, "eval")})
        bar.write(f"step {state.step}: eval loss {eval_loss:.4f}, {score_line(dev.metrics)}")
    if t.select_best == "none":
        return
    score = eval_loss if t.select_best == "loss" else dev.metrics[t.select_best]
    if state.record_eval(score, lower_is_better=t.select_best == "loss"):
        run.save()
        if logger:
            logger.log(state.step, {"best/step": state.step, f"best/{t.select_best}": score})
    elif t.early_stop and state.evals_since_best >= t.early_stop and dist.is_main:
        bar.write(f"medgpt: early stop: dev {t.select_best} has not improved on {state.best_score:.4f} (step "
                  f"{state.best_step}) in {state.evals_since_best} evaluations")


def _final_checkpoint(run: Engine, plan: ResumePlan, t: TrainConfig, dist: Dist) -> Path:
    """The checkpoint the test scoring and the export use, its weights in the engine: the last
    step's, or --select_best's."""
    # A finished run completing its test scoring resumed at its last step: its checkpoint is the last one.
    last = run.save() if run.state.step > plan.step else plan.checkpoint
    state, best = run.state, best_checkpoint(run.state, t)
    if best is None:
        return last
    if state.best_step != state.step:
        load_checkpoint(run.engine, best, dist)
    if dist.is_main:
        choice = {"metric": t.select_best, "score": state.best_score, "step": state.best_step, "checkpoint": str(best)}
        (Path(t.output_dir) / BEST_FILE).write_text(json.dumps(choice, indent=2))
        print(f"medgpt: --select_best {t.select_best}: scoring and exporting step {state.best_step} "
              f"(dev {t.select_best} {state.best_score:.4f})", flush=True)
    return best


def _save_and_exit(save: Callable[[], Path], stop_request: StopRequest, step: int, dist: Dist,
                   bar: Progress) -> NoReturn:
    """A stop signal reached some rank: checkpoint, and exit so the job is requeued and resumes."""
    save()
    if dist.is_main:
        bar.write(f"medgpt: stop requested ({stop_request.signal_name or 'on another rank'}): saved step {step}, "
                  f"exiting with {PREEMPTED_EXIT} so the job can be requeued and resume")
    raise SystemExit(PREEMPTED_EXIT)


def train(cfg: Config) -> None:
    t = cfg.train
    stop_request = StopRequest(t.stop_timeout)  # first: a signal that arrives during start-up is not lost
    watch_deepspeed_launcher()
    inputs = check_inputs(cfg)
    # Only valid input joins the process group (which also leaves DeepSpeed's buffers in /dev/shm).
    dist = init_distributed(t.device, collective_timeout=t.collective_timeout)
    plan = plan_resume(cfg, inputs.checkpoint, inputs.model_config, inputs.definition, dist.world_size,
                       report=dist.is_main)
    data = build_data(cfg, inputs, plan, dist)
    ds_config = resolve_run_ds_config(cfg, inputs, plan, data, dist)
    output_dir = Path(t.output_dir)
    end_parts = plan.end_parts(t, data.total_steps, report=dist.is_main)
    if dist.is_main:  # before the run's first write there: one run writes to an output_dir at a time
        lock_output_dir(output_dir)
    if "test" not in end_parts:  # a finished run: its export needs only the checkpoint's files, not an engine
        if end_parts:
            _export_final(plan.final_checkpoint(t), output_dir, dist)
        return
    provenance = run_provenance(dist)
    run = build_engine(cfg, inputs, plan, ds_config, data.total_steps, provenance, dist)
    engine, state = run.engine, run.state
    if dist.is_main:
        write_run_files(output_dir, cfg, ds_config, plan.history, provenance)
    peak_total = peak_tflops_total(cfg, dist)
    # Drops events an earlier run logged after this checkpoint (or, on a fresh start, before its first one).
    logger = MetricsLogger(cfg, data.global_batch, purge_step=state.step + 1) if dist.is_main else None
    if logger:
        logger.note("provenance", f"```yaml\n{yaml.safe_dump(provenance, sort_keys=False)}```", state.step + 1)
    if logger and plan.changes:
        logger.note("resume/changed_settings", "\n\n".join(describe_history(plan.history)), state.step + 1)
    window, skips, last_checkpoint = ThroughputWindow(), SkipCount(), plan.checkpoint
    exit_on_collective_timeout(dist, t.collective_timeout, lambda: state.step)
    batches = _step_batches(data, state, plan.grad_accum)
    # The bar is closed however the loop ends, so an error line never shares the bar's line.
    with Progress(data.total_steps, state.step, shown=dist.is_main) as bar:
        while not state.finished(data.total_steps, t.early_stop):
            lr, step_start = engine.get_lr()[0], time.perf_counter()
            stats = train_step(engine, next(batches), dist, stop_request.received, cfg.optim.grad_clip)
            state.advance(data.global_batch, data.steps_per_epoch)
            skips.add(stats.applied)
            check_step(stats, state.step + 1, t.precision, skips, t.max_skipped_steps, last_checkpoint, lr)
            # MFU counts the time of a skipped step but none of its work: it was thrown away.
            window.add(time.perf_counter() - step_start, stats.samples, stats.tokens, stats.positions,
                       stats.flops if stats.applied else 0.0)
            # A skipped update is no step: DeepSpeed does not advance the LR schedule either (engine.py:3540-3550).
            if not stats.applied:
                continue
            state.step += 1
            bar.update()
            last = state.step == data.total_steps
            if state.step % t.log_every == 0 or last:
                _log_step(logger, bar, state.step, state.epochs(data.global_batch, data.steps_per_epoch), stats, lr,
                          window.scalars(peak_total, stats.peak_memory), engine, skips)
                window = ThroughputWindow()
            if (t.eval_every and state.step % t.eval_every == 0) or last:
                _evaluate_dev(run, inputs.tokenizer, data, cfg, dist, logger, bar)
            if stats.stop and not last:
                _save_and_exit(run.save, stop_request, state.step, dist, bar)
            if t.save_every and state.step % t.save_every == 0 and not last:
                last_checkpoint = run.save()
    final = _final_checkpoint(run, plan, t, dist)
    _score_test(engine, inputs.tokenizer, data.test_records, cfg, dist, logger, state.step, final)
    if "export" in end_parts:
        _export_final(final, output_dir, dist)
