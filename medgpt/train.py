"""The training loop, top to bottom: config -> data -> model -> engine -> loop -> metrics.

Loss normalisation: the loss of one optimizer step is the summed cross-entropy of every answer
token in the global batch (all ranks, all accumulation micro-steps) divided by the number of
those tokens, so a step means the same thing whatever the world size or accumulation.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import yaml
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from medgpt.checkpoint import (
    TrainState,
    check_same_model,
    checkpoint_root,
    convert_to_universal,
    find_checkpoint,
    load_checkpoint,
    mark_finished,
    model_shape,
    read_finished,
    read_meta,
    save_checkpoint,
    universal_dir,
)
from medgpt.config import Config, DataConfig
from medgpt.data import (
    ResumableDistributedSampler,
    eval_loader,
    sample_lengths,
    to_device,
    train_loader,
    training_data,
)
from medgpt.distributed import Dist, adopt_launcher_env, exit_on_collective_timeout, init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config, zero_stage
from medgpt.errors import TrainingDiverged, UserError, check_all, launch_rank
from medgpt.export import export_checkpoint
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.lr_schedule import warmup_cosine
from medgpt.model import build_model, check_model_shape, load_model_config, load_tokenizer
from medgpt.outputs import check_output_dir
from medgpt.preemption import PREEMPTED_EXIT, StopRequest, watch_deepspeed_launcher
from medgpt.pubmedqa import Record, load_data
from medgpt.safe_load import check_checkpoint_files
from medgpt.scoring import evaluate_records, metric_scalars, write_results
from medgpt.throughput import ThroughputWindow, console_summary, device_peak, peak_memory_bytes, step_flops, use_tf32
from medgpt.tracking import MetricsLogger

# What a run does after its last step, in order, and the files each part leaves in output_dir.
END_PARTS = {"test": ("test_metrics.json", "test_predictions.json"), "export": ("export",)}


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
    flops: float  # model FLOPs the step needs (medgpt.throughput.step_flops)
    samples: int  # questions (a packed row holds several)
    peak_memory: list[int]  # bytes, per rank


def _host_counts(model_config: PretrainedConfig, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """[answer tokens, tokens, positions, samples, FLOPs] of this rank's micro-batches, from the
    host copies (no device sync)."""
    answers = [count_label_tokens(b["labels"]) for b in micro_batches]
    return [sum(answers), sum(int(b["sample_lengths"].sum()) for b in micro_batches),
            sum(b["input_ids"].numel() for b in micro_batches), sum(len(b["sample_lengths"]) for b in micro_batches),
            sum(step_flops(model_config, b["sample_lengths"], n) for b, n in zip(micro_batches, answers, strict=True))]


def train_step(engine: deepspeed.DeepSpeedEngine, micro_batches: list[dict[str, torch.Tensor]], dist: Dist,
               stop_requested: bool) -> StepStats:
    """One optimizer step over this rank's micro-batches.

    Two small collectives and one host-device sync per step, whatever the accumulation: the global
    counts before the first backward (the loss scale needs them; counted on the host, summed on
    the device without waiting), and after the step the loss, the stop flag and each rank's peak
    memory, read back once. Every step, not every logged one: a non-finite loss stops the run at
    once, and all ranks must agree to stop at the same step.
    """
    counts = dist.sum_(dist.tensor(_host_counts(engine.module.config, micro_batches)))
    # DeepSpeed averages gradients over ranks; multiplying by the world size turns that average
    # back into the sum over the global batch, which we divide by its answer-token count.
    scale = dist.world_size / counts[0].clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        loss = label_loss_sum(engine, to_device(batch, dist.device))
        engine.backward(loss * scale.to(loss.dtype), scale_wrt_gas=False)
        if i == len(micro_batches) - 1:
            grad_norm = unreported_grad_norm(engine)
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
    answer_tokens, tokens, positions, samples, flops, loss, stop, *peaks, norm_value = (
        torch.cat([counts, ends, norm.reshape(1)]).tolist())  # the step's one host-device sync
    return StepStats(loss=loss / max(answer_tokens, 1.0), grad_norm=None if grad_norm is None else norm_value,
                     applied=engine.was_step_applied(),
                     stop=stop > 0, answer_tokens=int(answer_tokens), tokens=int(tokens), positions=int(positions),
                     flops=flops, samples=int(samples), peak_memory=[int(p) for p in peaks])


def unreported_grad_norm(engine: deepspeed.DeepSpeedEngine) -> torch.Tensor | None:
    """The gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32 clips without
    keeping the norm). Called after the last backward, when the gradients are all-reduced."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


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


def check_step(stats: StepStats, step: int, precision: str, skipped_in_a_row: int, max_skipped: int,
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
    if skipped_in_a_row >= max_skipped:
        raise TrainingDiverged(f"fp16 loss scaling skipped {skipped_in_a_row} steps in a row up to step {step}: the "
                               f"gradients overflow at every loss scale. Use --precision bf16, lower --lr, or raise "
                               f"--max_skipped_steps; {kept}. Nothing was exported.")


def _accumulation_for(saved: dict, micro_batch_size: int, world_size: int) -> int:
    """Accumulation that keeps a resumed run's global batch equal to the checkpoint's."""
    global_batch = saved["global_batch"]
    accum, rest = divmod(global_batch, micro_batch_size * world_size)
    if rest or accum == 0:
        raise UserError(f"the checkpoint's global batch {global_batch} is not micro_batch_size x world size "
                        f"({micro_batch_size} x {world_size}) times a whole accumulation; pick a micro_batch_size "
                        "that divides it")
    return accum


def _check_same_packing(saved: dict, data: DataConfig, tag_dir: Path) -> None:
    """A checkpoint's data position counts packed rows or samples, and packs depend on seq_len:
    the position means nothing with another setting."""
    was = saved["config"]["data"].get("packing", False)  # checkpoints from before packing: off
    on_off = {True: "on", False: "off"}
    if was != data.packing:
        raise UserError(f"checkpoint '{tag_dir}' was trained with --packing {on_off[was]}, this run asks for "
                        f"--packing {on_off[data.packing]}; its position in the epoch only holds with the same "
                        f"setting: resume with --packing {on_off[was]}, or start fresh in another --output_dir")
    if data.packing and saved["config"]["data"]["seq_len"] != data.seq_len:
        raise UserError(f"checkpoint '{tag_dir}' packed its samples into rows of seq_len "
                        f"{saved['config']['data']['seq_len']}, this run asks for {data.seq_len}; its position in "
                        "the epoch only holds for the same packs: resume with the same --seq_len, or start fresh "
                        "in another --output_dir")


def _unfinished_parts(final: Path, output_dir: Path) -> list[str]:
    """The end parts still to do for a final checkpoint: those not recorded as completed in it,
    or whose files are gone from output_dir."""
    done = read_finished(final)
    return [part for part, files in END_PARTS.items()
            if part not in done or not all((output_dir / f).exists() for f in files)]


def _score_test(engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase, records: list[Record],
                cfg: Config, dist: Dist, logger: MetricsLogger | None, step: int, final: Path) -> None:
    """The official test set, once, with the final weights (all ranks score; rank 0 writes).
    Recorded in the final checkpoint last: a crash before that leaves it to the rerun (a crash
    between the TensorBoard flush and the record, a few milliseconds, would log it twice)."""
    test = evaluate_records(engine, tokenizer, records, dist, cfg.data.seq_len, cfg.train.eval_batch_size,
                            progress=dist.is_main)
    if dist.is_main:
        write_results(Path(cfg.train.output_dir), test.predictions(records), test.metrics, prefix="test_")
        logger.log(step, metric_scalars(test, "test"))
        logger.close()
        mark_finished(final, "test")
        print(f"test: accuracy {test.metrics['accuracy']:.3f}, macro-F1 {test.metrics['macro_f1']:.3f}")


def _export_final(final: Path, output_dir: Path, dist: Dist) -> None:
    """Rank 0 exports alone, after the process group is gone: no rank waits on it in a collective."""
    torch.distributed.destroy_process_group()
    if dist.is_main:
        export = output_dir / "export"
        shutil.rmtree(export, ignore_errors=True)  # medgpt's own output, replaced by the newer weights
        export_checkpoint(final, export)
        mark_finished(final, "export")
        print(f"medgpt: exported {export}", flush=True)


def train(cfg: Config) -> None:
    t = cfg.train
    stop_request = StopRequest(t.stop_timeout)  # first: a signal that arrives during start-up is not lost
    watch_deepspeed_launcher()

    # --- Everything that can be wrong with the input is checked before anything is written to output_dir
    # (the data cache below is written first: the number of packed rows sets the step count).
    # Independent checks all run, and every problem is reported together; then those that need their results.
    adopt_launcher_env()
    raw_ds_config, (records, split), model_config, tokenizer, resume_from, _ = check_all(
        lambda: load_ds_config(t.ds_config), lambda: load_data(cfg.data),
        lambda: check_model_shape(load_model_config(cfg.model), cfg.data.seq_len), lambda: load_tokenizer(cfg.model),
        lambda: find_checkpoint(t.resume, t.output_dir, report=launch_rank() == 0),
        lambda: check_output_dir(t.output_dir, "output_dir"))
    check_all(lambda: resume_from and check_checkpoint_files(resume_from, universal_dir(resume_from)))
    # Only valid input joins the process group (which also leaves DeepSpeed's buffers in /dev/shm).
    dist = init_distributed(t.device, collective_timeout=t.collective_timeout)
    if resume_from is None and t.resume == "none" and checkpoint_root(t.output_dir).exists():
        raise UserError(f"output_dir '{t.output_dir}' already holds checkpoints and --resume none would overwrite "
                        "them; use --resume auto to continue, or another --output_dir")
    saved = read_meta(resume_from) if resume_from else None
    if saved:
        check_same_model(saved, model_config, resume_from)
        _check_same_packing(saved, cfg.data, resume_from)
        accum = _accumulation_for(saved, t.micro_batch_size, dist.world_size)
        if accum != t.grad_accum and dist.is_main:
            print(f"medgpt: grad_accum {t.grad_accum} -> {accum} keeps the checkpoint's global batch "
                  f"{saved['global_batch']} on {dist.world_size} rank(s)", flush=True)
        t.grad_accum = accum
    # --- Data: tokenized (and packed) once per machine, or ahead by launcher/prepare_data.py.
    data = training_data(records, split, tokenizer, cfg.data, dist)
    if dist.is_main:
        print(f"medgpt: {'reused' if data.reused else 'built'} training data cache {data.cache}", flush=True)
    global_batch = t.micro_batch_size * t.grad_accum * dist.world_size  # rows: samples, or packs
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        rows = "packed rows" if cfg.data.packing else "questions"
        raise UserError(f"global batch {global_batch} (micro_batch_size x grad_accum x world size) is larger "
                        f"than the {len(data.train)} training {rows}; lower micro_batch_size or grad_accum")
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    ds_config = resolve_ds_config(raw_ds_config, cfg, dist.world_size, total_steps,
                                  hidden_size=model_config.n_embd, on_gpu=dist.device.type == "cuda")
    if dist.is_main and t.precision == "bf16" and zero_stage(ds_config) == 0:
        print("medgpt: note: ZeRO-0 in bf16 accumulates and all-reduces gradients in bf16 (DeepSpeed keeps fp32 "
              "accumulation for ZeRO >= 1); ZeRO-1 accumulates in fp32 at about the same memory", flush=True)
    end_parts = list(END_PARTS)
    if saved and saved["train_state"]["step"] >= total_steps:
        # A finished run: only what its end (test scoring, export) left undone.
        end_parts = _unfinished_parts(resume_from, Path(t.output_dir))
        if dist.is_main:
            print(f"medgpt: {resume_from} already finished all {total_steps} steps; "
                  + (f"completing its {' and '.join(end_parts)}" if end_parts else "nothing to do"), flush=True)
        if "test" not in end_parts:  # the export needs only the checkpoint's files, not an engine
            if end_parts:
                _export_final(resume_from, Path(t.output_dir), dist)
            return
    # A ZeRO checkpoint is partitioned per rank: on another world size it loads through
    # DeepSpeed's universal format.
    reshard = bool(saved) and saved["world_size"] != dist.world_size and saved["zero_stage"] > 0
    if reshard:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}

    pad_id = tokenizer.eos_token_id  # GPT-2 has no pad token; padded positions are masked anyway
    # Without packing, batches are grouped by length (packed rows are all about seq_len long).
    lengths = None if cfg.data.packing else sample_lengths(data.train)
    sampler = ResumableDistributedSampler(data.train, dist, seed=t.seed, lengths=lengths, global_batch=global_batch)
    loader = train_loader(data.train, sampler, t.micro_batch_size, pad_id, packed=cfg.data.packing, device=dist.device)
    dev_loader = eval_loader(data.dev, dist, t.eval_batch_size, pad_id)
    dev_records, test_records = [records[i] for i in split.dev], [records[i] for i in split.test]

    # --- Model and engine. The HfDeepSpeedConfig stays alive for the whole run: transformers
    # reads it to keep ZeRO-3 ranks in step when generating.
    model = build_model(cfg.model, model_config, ds_config, seed=t.seed)
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
    schedule = None if "scheduler" in ds_config else functools.partial(
        warmup_cosine, warmup_steps=cfg.optim.warmup_steps, total_steps=total_steps,
        min_ratio=cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                           lr_scheduler=schedule)
    torch.manual_seed(t.seed + dist.rank)  # dropout masks differ across ranks, reproducibly
    state = TrainState()
    if resume_from:
        state = load_checkpoint(engine, convert_to_universal(resume_from, dist) if reshard else resume_from, dist)
    start_step = state.step
    checkpoint_meta = {"global_batch": global_batch, "zero_stage": zero_stage(ds_config),
                       "model_shape": model_shape(model_config), "model_config": model_config.to_dict(),
                       "config": cfg.to_dict(),
                       # The wrapper decides the checkpoint's layout (medgpt/export.py reads it).
                       "optimizer": type(engine.optimizer).__name__}
    # The first write to output_dir: a model or engine that fails to build leaves the folder as it was.
    output_dir = Path(t.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    use_tf32(dist.device, t.tf32 and t.precision == "fp32")
    # MFU's denominator: the ranks' peaks summed (measured ones differ a little from rank to rank;
    # the barrier makes CPU ranks measure side by side, as they will train).
    dist.barrier()
    peak = device_peak(dist.device, t.precision, t.peak_tflops)
    (peak_total,) = dist.all_reduce_sum([peak.tflops])
    if dist.is_main:
        print(f"medgpt: MFU against {peak_total / dist.world_size:.4g} TFLOPS per device ({peak.source}) "
              f"x {dist.world_size} rank(s)", flush=True)

    # A resumed run drops any events the earlier run logged after its checkpoint.
    # (A fresh start purges from step 1: events of an earlier run that crashed before its first checkpoint.)
    logger = MetricsLogger(output_dir, purge_step=state.step + 1) if dist.is_main else None
    window = ThroughputWindow()
    exit_on_collective_timeout(dist, t.collective_timeout, lambda: state.step)
    last_checkpoint = resume_from
    skipped = skipped_in_a_row = 0  # steps whose update DeepSpeed skipped (fp16 loss-scale overflow)
    # The bar is closed however the loop ends, so an error line never shares the bar's line.
    with tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not dist.is_main,
              dynamic_ncols=True) as bar:
        while state.step < total_steps:
            sampler.set_epoch(state.epoch, state.consumed)
            batches = iter(loader)
            # A step counts once its update is applied, so a skipped one does not eat into the schedule:
            # DeepSpeed does not advance the LR scheduler either (runtime/engine.py:3540-3550).
            while state.step < total_steps and state.consumed // global_batch < steps_per_epoch:
                lr = engine.get_lr()[0]
                step_start = time.perf_counter()
                stats = train_step(engine, [next(batches) for _ in range(t.grad_accum)], dist, stop_request.received)
                state.consumed += global_batch
                skipped_in_a_row = 0 if stats.applied else skipped_in_a_row + 1
                skipped += not stats.applied
                check_step(stats, state.step + 1, t.precision, skipped_in_a_row, t.max_skipped_steps, last_checkpoint,
                           lr)
                # MFU counts the time of a skipped step but none of its work: it was thrown away.
                window.add(time.perf_counter() - step_start, stats.samples, stats.tokens, stats.positions,
                           stats.flops if stats.applied else 0.0)
                if not stats.applied:
                    continue
                state.step += 1
                bar.update(1)

                if state.step % t.log_every == 0 or state.step == total_steps:
                    perf = window.scalars(peak_total, stats.peak_memory)
                    window = ThroughputWindow()
                    scalars = {"train/loss": stats.loss, "train/lr": lr, **perf}
                    if stats.grad_norm is not None:
                        scalars["train/grad_norm"] = stats.grad_norm
                    if t.precision == "fp16":
                        # loss_scale: a property of every wrapper DeepSpeed puts around an fp16 optimizer
                        # (runtime/fp16/fused_optimizer.py:542, unfused_optimizer.py:333, zero/stage_1_and_2.py
                        # :3322, zero/stage3.py:3361); cur_scale exists only on the ZeRO ones.
                        scalars["train/loss_scale"] = float(engine.optimizer.loss_scale)
                        scalars["train/skipped_steps"] = skipped
                    if logger:
                        logger.log(state.step, scalars)
                        bar.set_postfix_str(f"loss {stats.loss:.4f} | lr {lr:.2e} | {console_summary(perf)}")

                if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
                    eval_loss = evaluate_loss(engine, dev_loader, dist)
                    # Answer accuracy / macro-F1 on the dev fold: log-likelihood scoring, all ranks.
                    dev = evaluate_records(engine, tokenizer, dev_records, dist, cfg.data.seq_len, t.eval_batch_size)
                    if logger:
                        logger.log(state.step, {"eval/loss": eval_loss, **metric_scalars(dev, "eval")})
                        bar.write(f"step {state.step}: eval loss {eval_loss:.4f}, accuracy "
                                  f"{dev.metrics['accuracy']:.3f}, macro-F1 {dev.metrics['macro_f1']:.3f}")

                if state.step < total_steps and stats.stop:
                    save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist, t.keep_last)
                    if dist.is_main:
                        bar.write(f"medgpt: stop requested ({stop_request.signal_name or 'on another rank'}): "
                                  f"saved step {state.step}, exiting "
                                  f"with {PREEMPTED_EXIT} so the job can be requeued and resume")
                    raise SystemExit(PREEMPTED_EXIT)
                if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
                    last_checkpoint = save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist,
                                                      t.keep_last)
            if state.consumed // global_batch >= steps_per_epoch:
                state.epoch += 1
                state.consumed = 0

    # A finished run completing its test scoring resumed at its last step: its checkpoint is the final one.
    final = (save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist, t.keep_last)
             if state.step > start_step else resume_from)
    _score_test(engine, tokenizer, test_records, cfg, dist, logger, state.step, final)
    if "export" in end_parts:
        _export_final(final, output_dir, dist)
