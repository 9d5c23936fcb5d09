"""Which process of the job this is, from the variables its launcher set: readable before any
process group exists and without torch, so that bad input is reported once per job (rank 0) even
by a ``--help``-light launcher (medgpt.errors.run_cli). medgpt.distributed adds the rendezvous."""
from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def in_srun_step() -> bool:
    """A task started by ``srun`` (one task per GPU). Only srun steps carry SLURM_STEP_ID: a plain
    ``python`` in a batch script also sees SLURM_PROCID and SLURM_NTASKS (the job's), but it is one
    process, not one task of many."""
    return "SLURM_STEP_ID" in os.environ


def rank_env() -> dict[str, str]:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun or the deepspeed launcher exported them; for a
    task of an srun step, SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; else rank 0 of 1."""
    env = os.environ
    if "RANK" in env:
        return {name: env[name] for name in RANK_VARIABLES if name in env}
    if in_srun_step():
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"]}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def launch_rank() -> int:
    """This process's rank as its launcher set it."""
    return int(rank_env()["RANK"])
