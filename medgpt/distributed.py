"""Who am I in the job: one small object passed to everything that needs rank or device."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over all ranks (float64, so token counts stay exact)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(deepspeed_comm: bool = True) -> Dist:
    """Join the process group set up by torchrun / the deepspeed launcher (or run alone).

    Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A plain
    ``python launcher/train.py`` has none of them: it becomes rank 0 of 1 on a free local port.
    ``deepspeed_comm=False`` joins through torch.distributed alone, for jobs without a DeepSpeed
    engine (evaluation): no DeepSpeed import, no communication op to build.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if deepspeed_comm:
        # DeepSpeed JIT-compiles ops into TORCH_EXTENSIONS_DIR; one folder per environment keeps
        # two virtualenvs on one host from rebuilding each other's ops at every start.
        if os.access(sys.prefix, os.W_OK):
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        import deepspeed  # slow import: only when a job really starts

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
