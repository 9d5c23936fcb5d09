"""Which process of the job this is, from the variables its launcher set: readable before any
process group exists and without torch, so that bad input is reported once per job (rank 0) even
by a ``--help``-light launcher (medgpt.errors.run_cli). medgpt.distributed adds the rendezvous."""
from __future__ import annotations

import os
import socket
import sys

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


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: derived from the job id, so every node computes the same
    one without talking to the others (an srun step's tasks, medgpt.distributed)."""
    return 15000 + job_id % 20000


def batch_rendezvous_port(job_id: int) -> int:
    """The rendezvous port of a batch job, chosen on its first host (slurm/common.sh): the one
    derived from the job id if nothing holds it there, else one the OS picks free. torchrun,
    finding its port taken, would become a *client* of whatever holds it and fail with "Failed to
    recv, got 0 bytes" (torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py:154-182:
    _create_tcp_store retries with is_server=False). Not the next port up: that one is derived for
    the next job, which may be an srun-direct job that cannot choose."""
    derived = slurm_master_port(job_id)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            # All addresses, as the store binds. No SO_REUSEADDR: a port whose old connections are
            # still in TIME_WAIT is passed over too, to be safe.
            probe.bind(("", derived))
            return derived
        except OSError:
            probe.bind(("", 0))
            return probe.getsockname()[1]


if __name__ == "__main__":  # slurm/common.sh: the rendezvous port of job <SLURM_JOB_ID>, on its first host
    print(batch_rendezvous_port(int(sys.argv[1])))
