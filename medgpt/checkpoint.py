"""Resumable state and DeepSpeed checkpoints around it.

Layout of ``<output_dir>/checkpoints/``: one folder per tag (``step<N>``) in DeepSpeed's own
format, plus

- ``<tag>/medgpt.json``: the TrainState, world size, global batch, ZeRO stage, model shape and
  the resolved config, readable without torch, so a resume is checked before any rank loads;
- ``<tag>/rng/rank<r>.pt``: each rank's Python / NumPy / torch (/ CUDA) RNG states;
- ``<tag>/tokenizer/``: the tokenizer, so a checkpoint exports on its own;
- ``<tag>/manifest.json``: every file of the tag and its size, written by rank 0 after every rank
  has finished the tag; a tag without one is incomplete (a save that did not finish);
- ``<tag>/finished.json``: which end-of-run parts (test scoring, export) completed with this tag's
  weights, so a rerun completes what a crash at the end left undone;
- ``latest``: written by rank 0 after the manifest (write + rename), so a crash in the middle of a
  save leaves the previous checkpoint as ``latest``.

Every checkpoint is verified against its manifest before it is used (``find_checkpoint``,
``resolve_checkpoint``): ``--resume auto`` falls back to the newest complete tag, an explicit path
to a broken one is an error.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medgpt.adam_replay import replay_cpu_adam_steps
from medgpt.config import Config
from medgpt.distributed import Dist
from medgpt.errors import NoSpaceLeft, UserError
from medgpt.model_shape import ModelShape

META_FILE = "medgpt.json"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
FINISHED_FILE = "finished.json"  # written after the manifest, so not listed in it


@dataclass
class TrainState:
    """Where the run is: everything a resumed run needs to continue at the next sample."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # global samples of this epoch already trained on

    # --select_best: the best dev score so far, the step whose checkpoint holds it, and the
    # evaluations since (--early_stop counts them). A resume continues the selection.
    best_score: float | None = None
    best_step: int = 0
    evals_since_best: int = 0

    def finished(self, total_steps: int, early_stop: int) -> bool:
        """All steps done, or --early_stop evaluations in a row without improvement (a rerun with a
        larger --early_stop continues)."""
        return self.step >= total_steps or 0 < early_stop <= self.evals_since_best

    def record_eval(self, score: float, lower_is_better: bool) -> bool:
        """Count one evaluation of the selected dev metric at this step; True: a new best (ties
        keep the earlier step)."""
        best = self.best_score
        if best is None or (score < best if lower_is_better else score > best):
            self.best_score, self.best_step, self.evals_since_best = score, self.step, 0
            return True
        self.evals_since_best += 1
        return False

    def epochs(self, global_batch: int, steps_per_epoch: int) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epoch + self.consumed / (global_batch * steps_per_epoch)

    def advance(self, global_batch: int, steps_per_epoch: int) -> None:
        """One optimizer step's samples consumed (applied or skipped), rolling over to the next epoch."""
        self.consumed += global_batch
        if self.consumed // global_batch >= steps_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0


@dataclass
class CheckpointMeta:
    """``<tag>/medgpt.json``: what a resume, a reshard and an export need to know about a tag,
    readable without torch and before any rank loads it."""
    config: Config  # the run's config as the user gave it
    model_config: dict[str, Any]  # the GPT2Config: an export rebuilds the model from it
    model_shape: ModelShape  # the fields that fix parameter shapes (see check_same_model)
    global_batch: int  # rows per optimizer step: a resume on another world size keeps it
    zero_stage: int
    # The wrapper DeepSpeed put around the optimizer decides the files' layout (medgpt/export.py).
    optimizer: str = ""  # "": a checkpoint from before it was recorded
    world_size: int = 1
    train_state: TrainState = field(default_factory=TrainState)
    # What the run trains on and towards (medgpt.resume_settings.run_definition); {}: not recorded.
    definition: dict[str, Any] = field(default_factory=dict)
    # Settings changed on resume, oldest first: {"step": first step with the new value, "name", "was", "now"}.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Versions, source commit, hosts and devices of the start that saved it (medgpt.provenance).
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)} - {"config", "train_state", "model_shape"}
        return cls(config=Config.from_dict(saved["config"]), train_state=TrainState(**saved["train_state"]),
                   model_shape=ModelShape.from_dict(saved["model_shape"]),
                   **{k: v for k, v in saved.items() if k in known})


def describe_history(history: list[dict[str, Any]]) -> list[str]:
    """One line per change: "step 12: lr 0.001 -> 0.0005"."""
    return [f"step {c['step']}: {c['name']} {c['was']} -> {c['now']}" for c in history]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step{step}"


def step_dir(output_dir: str | Path, step: int) -> Path:
    """The tag folder of a step's checkpoint."""
    return checkpoint_root(output_dir) / _tag(step)


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


def save_checkpoint(engine: Any, output_dir: str | Path, state: TrainState, meta: CheckpointMeta,
                    tokenizer: PreTrainedTokenizerBase, dist: Dist, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the tag folder."""
    root = checkpoint_root(output_dir)
    tag = _tag(state.step)
    tag_dir = root / tag
    if dist.is_main:
        _clear_tag(tag_dir)
    dist.barrier()  # no rank writes into the folder before it is cleared
    try:
        # The universal-checkpoint info is what ds_to_universal needs to reshard this tag later.
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state={
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        torch.save(_capture_rng(), _rng_file(tag_dir, dist.rank, mkdir=True))
        if dist.is_main:
            tokenizer.save_pretrained(str(tag_dir / "tokenizer"))
            tag_meta = dataclasses.replace(meta, train_state=state, world_size=dist.world_size)
            (tag_dir / META_FILE).write_text(json.dumps(tag_meta.to_dict(), indent=2))
    except (OSError, RuntimeError) as err:
        _raise_if_out_of_space(err, tag_dir)
        raise
    dist.barrier()  # every rank's files are complete before the manifest lists them
    if dist.is_main:
        _write_manifest(tag_dir)
        _write_atomically(root / LATEST_FILE, tag)
        _prune(root, keep_last, keep=_tag(state.best_step) if state.best_step else None)
    dist.barrier()
    return tag_dir


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _raise_if_out_of_space(err: BaseException, tag_dir: Path) -> None:
    """A save that failed for lack of space, said as such: torch's zip writer reports a full disk as
    "unexpected pos" (a RuntimeError without errno), so the file system's free space decides.
    `latest` still names the last complete checkpoint: nothing finished is lost."""
    free = shutil.disk_usage(tag_dir.parent).free
    latest = tag_dir.parent / LATEST_FILE
    previous = tag_dir.parent / latest.read_text().strip() if latest.is_file() else None
    written = _folder_bytes(tag_dir) if tag_dir.is_dir() else 0
    need = max(_folder_bytes(previous) if previous and previous.is_dir() else 0, written)
    if getattr(err, "errno", None) != errno.ENOSPC and free > max(need - written, 1 << 20):
        return
    size = f"about {need / 2**20:.0f} MiB" if previous else f"more than {written / 2**20:.0f} MiB"
    kept = f"'latest' still names {previous.name}" if previous else "no checkpoint was complete yet"
    raise NoSpaceLeft(f"no space left on {tag_dir.parent} while saving {tag_dir.name}: a checkpoint needs {size}, "
                      f"{free / 2**20:.0f} MiB are free; {kept}. Free space there (or lower --keep_last), delete "
                      f"the partial {tag_dir.name}, and rerun to resume") from None


def _clear_tag(tag_dir: Path) -> None:
    """Remove what an earlier save of the same step left: the files of a save that did not finish
    (or of a broken tag that --resume auto skipped), its stale manifest and finished record, and a
    universal copy converted from those older weights."""
    shutil.rmtree(tag_dir, ignore_errors=True)
    shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    """Write + rename: a reader sees the old content or the new one, never a part."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _write_manifest(tag_dir: Path) -> None:
    """Every file of the tag with its size. Sizes, not hashes: the faults that break a checkpoint
    here are a process killed mid-write (a truncated file) or before a rank wrote (a missing file),
    and sizes catch both from a stat. Hashing would re-read the whole tag on rank 0 at every save
    and every load while all other ranks wait: a GPT-2 XL ZeRO checkpoint with Adam states is about
    22 GB, over 17 s of SHA-256 at the 1.3 GB/s measured on this machine's CPU, before any disk read.
    (torch.load does not check the zip CRCs: a flipped byte in a tensor loads silently, measured.)"""
    files = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*"))
             if f.is_file() and f.name not in (MANIFEST_FILE, FINISHED_FILE)}
    _write_atomically(tag_dir / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def verify_checkpoint(tag_dir: Path) -> str | None:
    """What is wrong with a tag folder (None: complete): every file of its manifest present,
    readable and of the recorded size."""
    if not tag_dir.is_dir():
        return "the folder does not exist"
    try:
        files = json.loads((tag_dir / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}: its save did not finish, or a medgpt without manifests wrote it"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is damaged ({err})"
    problems = [problem for name, size in files.items() if (problem := _file_problem(tag_dir / name, name, size))]
    return "; ".join(problems[:3] + ([f"{len(problems) - 3} more"] if len(problems) > 3 else [])) or None


def _file_problem(path: Path, name: str, size: int) -> str | None:
    if not path.is_file():
        return f"{name} is missing"
    if not os.access(path, os.R_OK):
        return f"{name} is not readable"
    if path.stat().st_size != size:
        return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated or rewritten)"
    return None


def read_finished(tag_dir: Path) -> set[str]:
    """The end-of-run parts recorded as completed with this tag's weights."""
    try:
        return set(json.loads((tag_dir / FINISHED_FILE).read_text()))
    except (OSError, json.JSONDecodeError):  # none yet, or a write cut short: nothing recorded
        return set()


def mark_finished(tag_dir: Path, part: str) -> None:
    """Record that an end-of-run part completed (rank 0, after the part's outputs are written)."""
    _write_atomically(tag_dir / FINISHED_FILE, json.dumps(sorted(read_finished(tag_dir) | {part})))


def _rng_file(tag_dir: Path, rank: int, mkdir: bool = False) -> Path:
    folder = tag_dir / "rng"
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"rank{rank}.pt"


def step_tags(root: Path) -> list[Path]:
    """The step<N> folders of a checkpoints folder, newest first."""
    if not root.is_dir():
        return []
    tags = (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit())
    return sorted(tags, key=lambda p: int(p.name[4:]), reverse=True)


def _prune(root: Path, keep_last: int, keep: str | None) -> None:
    """Delete all but the newest keep_last checkpoints (0 keeps all), ``latest`` and ``keep`` (the
    --select_best one)."""
    if keep_last <= 0:
        return
    latest = (root / LATEST_FILE).read_text().strip()
    for old in step_tags(root)[keep_last:]:
        if old.name not in (latest, keep):
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)


def find_checkpoint(resume: str, output_dir: str | Path, report: bool = True) -> Path | None:
    """The tag folder to resume from: ``auto`` = the output_dir's newest complete checkpoint if any
    (see _newest_complete), ``none`` = fresh, else an explicit checkpoint (see resolve_checkpoint).
    ``report``: print the warnings (rank 0)."""
    if resume == "none":
        return None
    if resume == "auto":
        return _newest_complete(checkpoint_root(output_dir), report)
    return resolve_checkpoint(resume, "--resume")


def _newest_complete(root: Path, report: bool) -> Path | None:
    """``latest`` if it is complete, else the newest complete step folder, with one warning that
    names what was skipped: a missing or broken ``latest`` never silently restarts at step 0."""
    latest = root / LATEST_FILE
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named is not None and verify_checkpoint(named) is None:
        return named
    tags = step_tags(root)
    if named is None and not tags:
        return None  # a fresh output_dir
    chosen, skipped = None, []
    for tag in tags:
        problem = verify_checkpoint(tag)
        if problem is None:
            chosen = tag
            break
        skipped.append(f"skipped {tag.name}: {problem}")
    reasons = [f"{latest} is missing"] if named is None else []
    if named is not None and named not in tags[:len(skipped)]:
        reasons.append(f"{latest} names {named.name}: {verify_checkpoint(named)}")
    outcome = (f"resuming from {chosen}, the newest complete checkpoint" if chosen
               else "no complete checkpoint left: starting from step 0")
    if report:
        print(f"medgpt: warning: {'; '.join(reasons + skipped)}; {outcome}", file=sys.stderr, flush=True)
    return chosen


def resolve_checkpoint(given: str | Path, flag: str) -> Path:
    """An explicit checkpoint, verified: a tag folder, a checkpoints folder (its ``latest``) or a
    run's output_dir (its checkpoints' ``latest``). ``flag`` names the option in errors."""
    path = Path(given)
    for root in (path, checkpoint_root(path)):
        if (root / LATEST_FILE).is_file():
            path = root / (root / LATEST_FILE).read_text().strip()
            break
    if not (path / META_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
        raise UserError(f"{flag} '{given}' is not a medgpt checkpoint (no {META_FILE}); pass a run's output_dir, "
                        "its checkpoints folder or one of its step<N> folders")
    problem = verify_checkpoint(path)
    if problem:
        auto = ", or --resume auto, which takes the newest complete one" if flag == "--resume" else ""
        raise UserError(f"{flag} '{given}': checkpoint '{path}' is incomplete or damaged ({problem}); pass "
                        f"another of its step<N> folders{auto}")
    return path


def read_meta(tag_dir: Path) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_dict(json.loads((tag_dir / META_FILE).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        # Said for every program that reads it (train, export): no flag of only one of them.
        raise UserError(f"checkpoint '{tag_dir}' is incomplete or damaged: its {META_FILE} cannot be read ({err}); "
                        "use another of the run's step<N> checkpoints, or start a new run in another output "
                        "folder") from None


def check_same_model(meta: CheckpointMeta, config: PretrainedConfig, tag_dir: Path) -> None:
    """Refuse a checkpoint of another model shape or vocabulary, before any rank loads it."""
    saved, current = meta.model_shape, ModelShape.from_config(config)
    diffs = [f"{name}: checkpoint {was} vs model {now}" for name, was, now in saved.differences(current)]
    if diffs:
        raise UserError(f"checkpoint '{tag_dir}' is of another model shape ({'; '.join(diffs)}); "
                        "resume it with the --model it was trained with, or start fresh in another --output_dir")


# DeepSpeed's 16-bit wrappers at ZeRO-0, which hold the fp32 master weights. medgpt trains bf16 at
# ZeRO-0 as autocast over fp32 weights now (medgpt.ds_config); checkpoints written before have them.
HALF_PRECISION_WRAPPERS = ("FP16_UnfusedOptimizer", "FP16_Optimizer")


def check_continuable(meta: CheckpointMeta, tag_dir: Path) -> None:
    """Refuse a checkpoint whose optimizer state this medgpt builds no optimizer for."""
    if meta.zero_stage == 0 and meta.optimizer in HALF_PRECISION_WRAPPERS:
        raise UserError(f"checkpoint '{tag_dir}' was trained at ZeRO-0 in {meta.config.train.precision} inside "
                        f"DeepSpeed's {meta.optimizer}, which this medgpt no longer builds (ZeRO-0 in bf16 is "
                        "autocast over fp32 weights, with a plain AdamW): its optimizer state cannot be continued. "
                        f"Export it (python launcher/export.py --checkpoint {tag_dir} --output_dir DIR) and "
                        "fine-tune from DIR with --model DIR in another --output_dir, or finish the run with the "
                        "medgpt version that wrote it")


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


def needs_reshard(meta: CheckpointMeta, world_size: int) -> bool:
    """A ZeRO checkpoint is partitioned per rank: on another world size it loads through DeepSpeed's
    universal format."""
    return meta.world_size != world_size and meta.zero_stage > 0


def load_checkpoint(engine: Any, tag_dir: Path, dist: Dist) -> TrainState:
    """Load model, optimizer and scheduler state (all ranks), then this rank's RNG states; a tag
    of another world size through its universal copy."""
    universal = needs_reshard(read_meta(tag_dir), dist.world_size)
    if universal:
        tag_dir = convert_to_universal(tag_dir, dist)
    # Set per tag: a run resumed on 2 ranks may load a --select_best tag saved on 1. The engine reads
    # this flag only while loading (deepspeed/runtime/engine.py:1712-1713; its uses are all in
    # load_checkpoint and its helpers, engine.py:4388-4767).
    engine._config.load_universal_checkpoint = universal
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    replay_cpu_adam_steps(engine.basic_optimizer)
    rng = _rng_file(tag_dir, dist.rank)
    if rng.is_file():  # absent when this rank did not exist in the saving run
        _restore_rng(torch.load(rng, weights_only=True))
    return read_meta(tag_dir).train_state
