"""Resumable state and DeepSpeed checkpoints around it.

Layout of ``<output_dir>/checkpoints/``: one folder per tag (``step<N>``) in DeepSpeed's own
format, plus

- ``<tag>/medgpt.json``: the TrainState, world size, global batch, ZeRO stage, model shape and
  the resolved config, readable without torch, so a resume is checked before any rank loads;
- ``<tag>/rng/rank<r>.pt``: each rank's Python / NumPy / torch (/ CUDA) RNG states;
- ``<tag>/tokenizer/``: the tokenizer, so a checkpoint exports on its own;
- ``latest``: written by rank 0 only after every rank has finished the tag (write + rename),
  so a crash in the middle of a save leaves the previous checkpoint as ``latest``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medgpt.adam_replay import replay_cpu_adam_steps
from medgpt.distributed import Dist
from medgpt.errors import UserError

META_FILE = "medgpt.json"
LATEST_FILE = "latest"
# Fields that fix the parameter shapes: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")


@dataclass
class TrainState:
    """Where the run is: everything a resumed run needs to continue at the next sample."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # global samples of this epoch already trained on


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step{step}"


def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # NumPy's state as plain tensors and numbers, so it reads back with weights_only=True.
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_shape(config: PretrainedConfig) -> dict[str, Any]:
    return {k: getattr(config, k, None) for k in SHAPE_FIELDS}


def save_checkpoint(engine: Any, output_dir: str | Path, state: TrainState, meta: dict[str, Any],
                    tokenizer: PreTrainedTokenizerBase, dist: Dist, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the tag folder."""
    root = checkpoint_root(output_dir)
    tag = _tag(state.step)
    tag_dir = root / tag
    # The universal-checkpoint info is what ds_to_universal needs to reshard this tag later.
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state={
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
    torch.save(_capture_rng(), _rng_file(tag_dir, dist.rank, mkdir=True))
    if dist.is_main:
        tokenizer.save_pretrained(str(tag_dir / "tokenizer"))
        full_meta = {**meta, "train_state": dataclasses.asdict(state), "world_size": dist.world_size}
        (tag_dir / META_FILE).write_text(json.dumps(full_meta, indent=2))
    dist.barrier()  # every rank's files are complete before the tag becomes `latest`
    if dist.is_main:
        staging = root / f".{LATEST_FILE}.tmp"
        staging.write_text(tag)
        os.replace(staging, root / LATEST_FILE)
        _prune(root, keep_last)
    dist.barrier()
    return tag_dir


def _rng_file(tag_dir: Path, rank: int, mkdir: bool = False) -> Path:
    folder = tag_dir / "rng"
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"rank{rank}.pt"


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    tags = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and
                   p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    latest = (root / LATEST_FILE).read_text().strip()
    for old in tags[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / f"{old.name}_universal", ignore_errors=True)


def find_checkpoint(resume: str, output_dir: str | Path) -> Path | None:
    """The tag folder to resume from: ``auto`` = latest in output_dir if any, ``none`` = fresh,
    else a checkpoints folder (its ``latest``) or a tag folder."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        return root / (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    path = Path(resume)
    if (path / LATEST_FILE).is_file():
        path = path / (path / LATEST_FILE).read_text().strip()
    if not (path / META_FILE).is_file():
        raise UserError(f"--resume '{resume}' is not a medgpt checkpoint (no {META_FILE}); pass a "
                        "checkpoints folder, one of its step<N> folders, 'auto' or 'none'")
    return path


def read_meta(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint '{tag_dir}' is incomplete or damaged ({err}); resume from "
                        "another one or start with --resume none") from None


def check_same_model(meta: dict[str, Any], config: PretrainedConfig, tag_dir: Path) -> None:
    """Refuse a checkpoint of another model shape or vocabulary, before any rank loads it."""
    saved, current = meta["model_shape"], model_shape(config)
    diffs = [f"{k}: checkpoint {saved.get(k)} vs model {current[k]}" for k in SHAPE_FIELDS if saved.get(k) != current[k]]
    if diffs:
        raise UserError(f"checkpoint '{tag_dir}' is of another model shape ({'; '.join(diffs)}); "
                        "resume it with the --model it was trained with, or start fresh with --resume none")


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / f"{tag_dir.name}_universal"


def ds_to_universal(tag_dir: Path, output: Path) -> None:
    """DeepSpeed's documented converter, run as its own command line: ``output/zero/<param>/fp32.pt``
    etc., one folder per parameter, whatever the world size and optimizer wrapper that saved it."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(tag_dir), "--output_folder", str(output), "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def convert_to_universal(tag_dir: Path, dist: Dist) -> Path:
    """DeepSpeed's universal checkpoint of a tag (made once, by rank 0), which loads on any
    world size. Written to a staging folder and renamed, so a half conversion is never used."""
    target = universal_dir(tag_dir)
    if dist.is_main and not target.exists():
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        ds_to_universal(tag_dir, staging)
        for name in (META_FILE, "tokenizer", "rng"):
            src = tag_dir / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, staging / name)
        os.rename(staging, target)
    dist.barrier()
    return target


def load_checkpoint(engine: Any, tag_dir: Path, dist: Dist) -> TrainState:
    """Load model, optimizer and scheduler state (all ranks), then this rank's RNG states."""
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    replay_cpu_adam_steps(engine.basic_optimizer)
    rng = _rng_file(tag_dir, dist.rank)
    if rng.is_file():  # absent when this rank did not exist in the saving run
        _restore_rng(torch.load(rng, weights_only=True))
    return TrainState(**read_meta(tag_dir)["train_state"])
