"""A training run's start, in the order it happens: check the input (nothing written yet), plan the
resume, build the data, then the engine. Each step returns one typed object the next one takes."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medgpt.checkpoint import (
    CheckpointMeta,
    TrainState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    universal_dir,
)
from medgpt.compilation import compile_engine
from medgpt.config import HISTORY_KEY, PROVENANCE_KEY, Config
from medgpt.data import ResumableDistributedSampler, eval_loader, sample_lengths, train_loader, training_data
from medgpt.distributed import Dist, adopt_launcher_env
from medgpt.ds_config import load_ds_config, resolve_ds_config, zero_stage
from medgpt.errors import UserError, check_all
from medgpt.launch_env import launch_rank
from medgpt.lora import trainable_parameters
from medgpt.lr_schedule import warmup_cosine
from medgpt.model import build_model, check_model_shape, check_packing_isolation, load_model_config, load_tokenizer
from medgpt.model_shape import ModelShape
from medgpt.op_builds import announce_builds, optimizer_builders
from medgpt.outputs import check_output_dir
from medgpt.pubmedqa import Record, Split, load_data
from medgpt.resume import ResumePlan, check_fresh_start
from medgpt.resume_settings import apply_optimizer_settings, run_definition
from medgpt.safe_load import check_checkpoint_files
from medgpt.throughput import device_peak, use_tf32


@dataclass
class Inputs:
    """Everything read from outside the process and checked, before the process group exists."""
    raw_ds_config: dict[str, Any]
    records: list[Record]
    split: Split
    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    checkpoint: Path | None  # the verified tag folder --resume names; None: a fresh start
    definition: dict[str, Any]  # what the run trains on and towards (medgpt.resume_settings)


def check_inputs(cfg: Config) -> Inputs:
    """Everything that can be wrong with the input, before anything is written to output_dir
    (the data cache is written first, after this: the number of packed rows sets the step count).
    Independent checks all run and every problem is reported together; then those that need
    their results."""
    t = cfg.train
    adopt_launcher_env()
    raw_ds_config, (records, split), model_config, tokenizer, checkpoint, *_ = check_all(
        lambda: load_ds_config(t.ds_config), lambda: load_data(cfg.data),
        lambda: check_model_shape(load_model_config(cfg.model), cfg.data.seq_len), lambda: load_tokenizer(cfg.model),
        lambda: find_checkpoint(t.resume, t.output_dir, report=launch_rank() == 0),
        lambda: check_output_dir(t.output_dir, "output_dir"), lambda: check_fresh_start(t),
        lambda: cfg.data.packing and check_packing_isolation())
    if checkpoint:  # needs find_checkpoint's answer
        check_checkpoint_files(checkpoint, universal_dir(checkpoint))
    return Inputs(raw_ds_config, records, split, model_config, tokenizer, checkpoint,
                  run_definition(cfg, records, tokenizer))


@dataclass
class Data:
    """The run's batches and how many steps they make."""
    sampler: ResumableDistributedSampler
    train: torch.utils.data.DataLoader
    dev: torch.utils.data.DataLoader  # answer-token loss on the dev fold
    dev_records: list[Record]  # accuracy / macro-F1 on the dev fold
    test_records: list[Record]
    global_batch: int  # rows per optimizer step: samples, or packs
    steps_per_epoch: int
    total_steps: int


def build_data(cfg: Config, inputs: Inputs, plan: ResumePlan, dist: Dist) -> Data:
    """Tokenized (and packed) once per machine, or ahead by launcher/prepare_data.py."""
    t = cfg.train
    data = training_data(inputs.records, inputs.split, inputs.tokenizer, cfg.data, dist)
    if dist.is_main:
        print(f"medgpt: {'reused' if data.reused else 'built'} training data cache {data.cache}", flush=True)
    global_batch = t.micro_batch_size * plan.grad_accum * dist.world_size
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        rows = "packed rows" if cfg.data.packing else "questions"
        raise UserError(f"global batch {global_batch} (micro_batch_size x grad_accum x world size) is larger "
                        f"than the {len(data.train)} training {rows}; lower micro_batch_size or grad_accum")
    pad_id = inputs.tokenizer.eos_token_id  # GPT-2 has no pad token; padded positions are masked anyway
    # Without packing, batches are grouped by length (packed rows are all about seq_len long).
    lengths = None if cfg.data.packing else sample_lengths(data.train)
    sampler = ResumableDistributedSampler(data.train, dist, seed=t.seed, lengths=lengths, global_batch=global_batch)
    records, split = inputs.records, inputs.split
    return Data(sampler=sampler,
                train=train_loader(data.train, sampler, t.micro_batch_size, pad_id, packed=cfg.data.packing,
                                   device=dist.device, width=cfg.data.seq_len if t.compile else None),
                dev=eval_loader(data.dev, dist, t.eval_batch_size, pad_id),
                dev_records=[records[i] for i in split.dev], test_records=[records[i] for i in split.test],
                global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                total_steps=t.max_steps or t.epochs * steps_per_epoch)


def resolve_run_ds_config(cfg: Config, inputs: Inputs, plan: ResumePlan, data: Data, dist: Dist) -> dict[str, Any]:
    ds_config = resolve_ds_config(inputs.raw_ds_config, cfg, dist.world_size, data.total_steps,
                                  hidden_size=inputs.model_config.n_embd, on_gpu=dist.device.type == "cuda",
                                  grad_accum=plan.grad_accum)
    return ds_config


@dataclass
class Engine:
    """The DeepSpeed engine and what the loop and the checkpoints need with it."""
    engine: deepspeed.DeepSpeedEngine
    state: TrainState  # where the run is; the loop advances it
    meta: CheckpointMeta  # written with every checkpoint
    hf_deepspeed_config: Any  # kept alive for the run: transformers reads it to keep ZeRO-3 ranks in step
    _save: Callable[[], Path]
    _saved: tuple[int, Path] | None = None  # the step saved last, and its tag folder

    def save(self) -> Path:
        """A checkpoint of the current state (collective: every rank calls it), once per step:
        --select_best, --save_every, a stop and the end may all ask at the same step."""
        if self._saved is None or self._saved[0] != self.state.step:
            self._saved = (self.state.step, self._save())
        return self._saved[1]


def initialize_engine(model: torch.nn.Module, ds_config: dict[str, Any], dist: Dist,
                      schedule: Callable[[torch.optim.Optimizer], Any] | None = None) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed's engine around the model's trainable parameters, as the training step uses it."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable_parameters(model), config=ds_config,
                                           lr_scheduler=schedule)
    if zero_stage(ds_config) == 0 and dist.world_size == 1:
        # One rank has nothing to average: DeepSpeed's all-reduce at ZeRO-0 would still flatten the
        # gradients, reduce them over the one rank and copy each back (engine.py allreduce_gradients).
        engine.enable_backward_allreduce = False
    return engine


def build_engine(cfg: Config, inputs: Inputs, plan: ResumePlan, ds_config: dict[str, Any], total_steps: int,
                 provenance: dict[str, Any], dist: Dist) -> Engine:
    """The model inside DeepSpeed, at the checkpoint's state when resuming."""
    use_tf32(dist.device, cfg.train.tf32 and cfg.train.precision == "fp32")
    t, model_config = cfg.train, inputs.model_config
    model, hf_deepspeed_config = build_model(cfg.model, model_config, ds_config, seed=t.seed)
    schedule = None if "scheduler" in ds_config else functools.partial(
        warmup_cosine, warmup_steps=cfg.optim.warmup_steps, total_steps=total_steps, min_ratio=cfg.optim.min_lr_ratio)
    announce_builds(optimizer_builders(ds_config), show=dist.is_main)
    engine = initialize_engine(model, ds_config, dist, schedule)
    if t.compile:
        compile_engine(engine)
    torch.manual_seed(t.seed + dist.rank)  # dropout masks differ across ranks, reproducibly
    state = TrainState()
    if plan.checkpoint:
        state = load_checkpoint(engine, plan.checkpoint, dist)
        if plan.changes:  # unchanged: the restored values stand, so the resume stays bit-exact
            apply_optimizer_settings(engine, ds_config["optimizer"]["params"])
    meta = CheckpointMeta(config=cfg, model_config=model_config.to_dict(),
                          model_shape=ModelShape.from_config(model_config),
                          global_batch=t.micro_batch_size * plan.grad_accum * dist.world_size,
                          zero_stage=zero_stage(ds_config), optimizer=type(engine.optimizer).__name__,
                          definition=inputs.definition, history=plan.history, provenance=provenance)
    save = functools.partial(save_checkpoint, engine, t.output_dir, state, meta, inputs.tokenizer, dist, t.keep_last)
    return Engine(engine, state, meta, hf_deepspeed_config, save)


def write_run_files(output_dir: Path, cfg: Config, ds_config: dict[str, Any], history: list[dict[str, Any]],
                    provenance: dict[str, Any]) -> None:
    """The first write to output_dir (rank 0): a model or engine that fails to build leaves the
    folder as it was. config.yaml ends with the settings changed on resume and this start's
    provenance (read back as --config, those are ignored)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    recorded = {**cfg.to_dict(), **({HISTORY_KEY: history} if history else {}), PROVENANCE_KEY: provenance}
    (output_dir / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))


def peak_tflops_total(cfg: Config, dist: Dist) -> float:
    """MFU's denominator: the ranks' peaks summed (measured ones differ a little from rank to rank;
    the barrier makes CPU ranks measure side by side, as they will train)."""
    dist.barrier()
    peak = device_peak(dist.device, cfg.train.precision, cfg.train.peak_tflops)
    (total,) = dist.all_reduce_sum([peak.tflops])
    if dist.is_main:
        print(f"medgpt: MFU against {total / dist.world_size:.4g} TFLOPS per device ({peak.source}) "
              f"x {dist.world_size} rank(s)", flush=True)
    return total
