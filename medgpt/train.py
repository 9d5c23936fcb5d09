"""The training loop, top to bottom: config -> data -> model -> engine -> loop -> metrics.

Loss normalisation: the loss of one optimizer step is the summed cross-entropy of every answer
token in the global batch (all ranks, all accumulation micro-steps) divided by the number of
those tokens, so a step means the same thing whatever the world size or accumulation.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import yaml
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from medgpt.checkpoint import (TrainState, check_same_model, checkpoint_root, convert_to_universal, find_checkpoint,
                               load_checkpoint, model_shape, read_meta, save_checkpoint)
from medgpt.config import Config, DataConfig
from medgpt.data import ResumableDistributedSampler, eval_loader, train_loader, training_data
from medgpt.distributed import Dist, exit_on_collective_timeout, init_distributed
from medgpt.ds_config import load_ds_config, resolve_ds_config, zero_stage
from medgpt.errors import UserError
from medgpt.evaluate import evaluate_records, metric_scalars, write_results
from medgpt.export import export_checkpoint
from medgpt.loss import count_label_tokens, label_loss_sum
from medgpt.lr_schedule import warmup_cosine
from medgpt.metrics import MetricsLogger
from medgpt.model import build_model, load_model_config, load_tokenizer
from medgpt.preemption import PREEMPTED_EXIT, StopRequest, watch_deepspeed_launcher
from medgpt.pubmedqa import load_records, official_split
from medgpt.throughput import ThroughputWindow, console_summary, device_peak, peak_memory_bytes, step_flops


@dataclass
class StepStats:
    loss: float
    answer_tokens: int  # tokens carrying loss, all ranks
    tokens: int  # non-pad tokens, all ranks
    positions: int  # token positions computed, padding included (rows x width), all ranks
    flops: float  # model FLOPs the step needs (medgpt.throughput.step_flops), all ranks
    samples: int  # questions, all ranks (a packed row holds several)
    grad_norm: float  # before clipping


def train_step(engine: deepspeed.DeepSpeedEngine, micro_batches: list[dict[str, torch.Tensor]],
               dist: Dist) -> StepStats:
    """One optimizer step over this rank's micro-batches."""
    answer_counts = [count_label_tokens(b["labels"]) for b in micro_batches]
    local_tokens = sum(int(b["sample_lengths"].sum()) for b in micro_batches)
    local_positions = sum(b["input_ids"].numel() for b in micro_batches)
    local_samples = sum(len(b["sample_lengths"]) for b in micro_batches)
    local_flops = sum(step_flops(engine.module.config, b["sample_lengths"], answers)
                      for b, answers in zip(micro_batches, answer_counts))
    answer_tokens, tokens, positions, samples, flops = dist.all_reduce_sum(
        [sum(answer_counts), local_tokens, local_positions, local_samples, local_flops])
    # DeepSpeed averages gradients over ranks; multiplying by the world size turns that average
    # back into the sum over the global batch, which we divide by its answer-token count.
    scale = dist.world_size / max(answer_tokens, 1.0)
    local_loss, grad_norm = 0.0, None
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        loss_sum = label_loss_sum(engine, batch)
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        if i == len(micro_batches) - 1:
            grad_norm = unreported_grad_norm(engine)
        engine.step()  # the optimizer steps only at the accumulation boundary
        local_loss += loss_sum.item()
    (loss,) = dist.all_reduce_sum([local_loss])
    if grad_norm is None:
        grad_norm = float(engine.get_global_grad_norm())
    return StepStats(loss=loss / max(answer_tokens, 1.0), answer_tokens=int(answer_tokens), tokens=int(tokens),
                     positions=int(positions), flops=flops, samples=int(samples), grad_norm=grad_norm)


def unreported_grad_norm(engine: deepspeed.DeepSpeedEngine) -> float | None:
    """The gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32 clips without
    keeping the norm). Called after the last backward, when the gradients are all-reduced."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads))


@torch.no_grad()
def evaluate_loss(engine: deepspeed.DeepSpeedEngine, loader: torch.utils.data.DataLoader, dist: Dist) -> float:
    """Mean answer-token loss over a held-out set (every rank takes part: ZeRO-3 needs it)."""
    engine.eval()
    loss_sum, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        loss_sum += label_loss_sum(engine, batch).item()
        count += count_label_tokens(batch["labels"])
    engine.train()
    total, n = dist.all_reduce_sum([loss_sum, count])
    return total / max(n, 1.0)


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


def train(cfg: Config) -> None:
    t = cfg.train
    stop_request = StopRequest(t.stop_timeout)  # first: a signal that arrives during start-up is not lost
    watch_deepspeed_launcher()
    dist = init_distributed(collective_timeout=t.collective_timeout)

    # --- Everything that can be wrong with the input is checked before anything is written to output_dir
    # (the data cache below is written first: the number of packed rows sets the step count).
    raw_ds_config = load_ds_config(t.ds_config)
    records = load_records(cfg.data.data)
    split = official_split(records, cfg.data.fold)
    model_config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    resume_from = find_checkpoint(t.resume, t.output_dir)
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
    if saved and saved["train_state"]["step"] >= total_steps:
        if dist.is_main:
            print(f"medgpt: {resume_from} already finished all {total_steps} steps; nothing to do", flush=True)
        return
    # A ZeRO checkpoint is partitioned per rank: on another world size it loads through
    # DeepSpeed's universal format.
    reshard = bool(saved) and saved["world_size"] != dist.world_size and saved["zero_stage"] > 0
    if reshard:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}

    pad_id = tokenizer.eos_token_id  # GPT-2 has no pad token; padded positions are masked anyway
    # Without packing, batches are grouped by length (packed rows are all about seq_len long).
    lengths = None if cfg.data.packing else [len(ids) for ids in data.train["input_ids"]]
    sampler = ResumableDistributedSampler(data.train, dist, seed=t.seed, lengths=lengths, global_batch=global_batch)
    loader = train_loader(data.train, sampler, t.micro_batch_size, pad_id, packed=cfg.data.packing)
    dev_loader = eval_loader(data.dev, dist, t.eval_batch_size, pad_id)
    dev_records, test_records = [records[i] for i in split.dev], [records[i] for i in split.test]

    output_dir = Path(t.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

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
    checkpoint_meta = {"global_batch": global_batch, "zero_stage": zero_stage(ds_config),
                       "model_shape": model_shape(model_config), "model_config": model_config.to_dict(),
                       "config": cfg.to_dict()}

    # MFU's denominator: the ranks' peaks summed (measured ones differ a little from rank to rank;
    # the barrier makes CPU ranks measure side by side, as they will train).
    dist.barrier()
    peak = device_peak(dist.device, t.precision, t.peak_tflops)
    (peak_total,) = dist.all_reduce_sum([peak.tflops])
    if dist.is_main:
        print(f"medgpt: MFU against {peak_total / dist.world_size:.4g} TFLOPS per device ({peak.source}) "
              f"x {dist.world_size} rank(s)", flush=True)

    # A resumed run drops any events the earlier run logged after its checkpoint.
    logger = MetricsLogger(output_dir, purge_step=state.step + 1 if resume_from else None) if dist.is_main else None
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not dist.is_main,
               dynamic_ncols=True)
    window = ThroughputWindow()
    exit_on_collective_timeout(dist, t.collective_timeout, lambda: state.step)
    while state.step < total_steps:
        sampler.set_epoch(state.epoch, state.consumed)
        batches = iter(loader)
        steps_this_epoch = min(steps_per_epoch - state.consumed // global_batch, total_steps - state.step)
        for _ in range(steps_this_epoch):
            lr = engine.get_lr()[0]
            step_start = time.perf_counter()
            stats = train_step(engine, [next(batches) for _ in range(t.grad_accum)], dist)
            window.add(time.perf_counter() - step_start, stats.samples, stats.tokens, stats.positions, stats.flops)
            state.step += 1
            state.consumed += global_batch
            bar.update(1)

            if state.step % t.log_every == 0 or state.step == total_steps:
                # A collective: every rank logs at the same steps.
                peak_mem = dist.all_gather_objects(peak_memory_bytes(dist.device))
                perf = window.scalars(peak_total, peak_mem)
                window = ThroughputWindow()
                scalars = {"train/loss": stats.loss, "train/lr": lr, "train/grad_norm": stats.grad_norm, **perf}
                if t.precision == "fp16":
                    scalars["train/loss_scale"] = float(engine.optimizer.cur_scale)
                if logger:
                    logger.log(state.step, scalars)
                    bar.set_postfix_str(f"loss {stats.loss:.4f} | lr {lr:.2e} | {console_summary(perf)}")

            if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
                eval_loss = evaluate_loss(engine, dev_loader, dist)
                # Answer accuracy / macro-F1 on the dev fold: log-likelihood scoring, all ranks.
                dev = evaluate_records(engine, tokenizer, dev_records, dist, cfg.data.seq_len, t.eval_batch_size)
                if logger:
                    logger.log(state.step, {"eval/loss": eval_loss, **metric_scalars(dev, "eval")})
                    bar.write(f"step {state.step}: eval loss {eval_loss:.4f}, accuracy {dev.metrics['accuracy']:.3f}, "
                              f"macro-F1 {dev.metrics['macro_f1']:.3f}")

            if state.step < total_steps and stop_request.agreed(dist):
                save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist, t.keep_last)
                if dist.is_main:
                    bar.write(f"medgpt: stop requested ({stop_request.signal_name or 'on another rank'}): "
                              f"saved step {state.step}, exiting "
                              f"with {PREEMPTED_EXIT} so the job can be requeued and resume")
                raise SystemExit(PREEMPTED_EXIT)
            if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
                save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist, t.keep_last)
        if state.consumed // global_batch >= steps_per_epoch:
            state.epoch += 1
            state.consumed = 0

    bar.close()
    final = save_checkpoint(engine, output_dir, state, checkpoint_meta, tokenizer, dist, t.keep_last)

    # --- The official test set, once, with the final weights (all ranks score; rank 0 writes).
    test = evaluate_records(engine, tokenizer, test_records, dist, cfg.data.seq_len, t.eval_batch_size,
                            progress=dist.is_main)
    if dist.is_main:
        write_results(output_dir, test.predictions(test_records), test.metrics, prefix="test_")
        logger.log(state.step, metric_scalars(test, "test"))
        logger.close()
        print(f"test: accuracy {test.metrics['accuracy']:.3f}, macro-F1 {test.metrics['macro_f1']:.3f}")
    torch.distributed.destroy_process_group()
    # Rank 0 exports alone, after the process group is gone: no rank waits on it in a collective.
    if dist.is_main:
        export = output_dir / "export"
        shutil.rmtree(export, ignore_errors=True)  # medgpt's own output, replaced by the newer weights
        export_checkpoint(final, export)
        print(f"medgpt: exported {export}", flush=True)
