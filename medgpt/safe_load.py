"""Checkpoint files are pickles, and unpickling can call any function the file names: a crafted
checkpoint runs code the moment it is loaded. Every checkpoint file a user passes is therefore
read as weights only (``torch.load(weights_only=True)``: tensors, plain containers and numbers).

DeepSpeed's own loaders all call ``torch.load(..., weights_only=False)`` with no way to ask for
less: ``engine.load_checkpoint`` through its TorchCheckpointEngine
(deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py:37), ZeRO consolidation
(deepspeed/utils/zero_to_fp32.py:146, 153, 204), the universal-checkpoint converter and loader
(deepspeed/checkpoint/ds_to_universal.py, universal_checkpoint.py:251). So before DeepSpeed
touches a checkpoint folder, :func:`check_checkpoint_files` loads each of its files as weights
only; one that needs anything more is refused with exit 2 and never reaches DeepSpeed.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from medgpt.errors import UserError

# The only non-torch types in DeepSpeed's checkpoints (ZeRO 0-3, fp32 and bf16: listed with
# torch.serialization.get_unsafe_globals_in_checkpoint). Each is plain data: an int Enum rebuilt
# from its value, a dataclass of two ints, and a loss scaler whose attributes are set as saved;
# building them runs nothing the file chooses.
DEEPSPEED_TYPES = [LossScaler, ZeroStageEnum, fragment_address]


def load_weights(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of a file the user passed, as weights only; a file that names anything else
    (a function it would call) is a UserError."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint file '{path}' holds more than weights (it would call {_unsafe_names(path)}); "
                        "refused, because loading it could run code: resume or export only checkpoints that "
                        "medgpt wrote") from None
    except RuntimeError as err:  # not a zip written by torch.save (the format DeepSpeed writes), or cut short
        raise UserError(f"checkpoint file '{path}' is damaged or not a torch checkpoint "
                        f"({str(err).splitlines()[0]}); resume or export another checkpoint") from None


def _unsafe_names(path: Path) -> str:
    """What the pickle would call, read statically (nothing is executed)."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_TYPES):
            return ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except ValueError:  # an old-format (non-zip) file: torch lists nothing
        return "functions outside torch's weights-only set"


def check_checkpoint_files(*folders: Path) -> None:
    """Every ``.pt`` file under the folders (those that exist) loads as weights only. Memory-mapped:
    the tensors' bytes are not read, only the pickles are checked."""
    for folder in folders:
        for path in sorted(folder.rglob("*.pt")) if folder.is_dir() else []:
            load_weights(path, mmap=True)
