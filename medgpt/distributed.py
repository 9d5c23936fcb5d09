"""Who am I in the job: one small object passed to everything that needs rank or device."""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

import torch
import torch.distributed as torch_dist

from medgpt.config import DEVICES
from medgpt.console import library_prints
from medgpt.errors import STALLED_EXIT, UserError
from medgpt.launch_env import in_srun_step, rank_env, slurm_master_port
from medgpt.op_builds import announce_builds


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Dist:
        """The one process of a job without a process group (data preparation, tests): rank 0 of 1,
        whose collectives return their input."""
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def tensor(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Host numbers (a sequence or a host tensor) as a new float64 tensor on this rank's device
        (float64: token counts stay exact), copied without making the host wait (from pinned memory
        on a GPU)."""
        host = (values.to(torch.float64, copy=True) if isinstance(values, torch.Tensor)
                else torch.tensor(values, dtype=torch.float64))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; on a GPU the host does not wait for it."""
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few scalars over all ranks and read them back."""
        return self.sum_(self.tensor(values)).tolist()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that has no fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7``), expanded by SLURM itself."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        raise UserError(f"cannot expand the SLURM node list '{nodelist}' with scontrol: {err}") from err
    if not hosts:
        raise UserError(f"the SLURM node list '{nodelist}' names no host")
    try:
        socket.getaddrinfo(hosts[0], None)
    except socket.gaierror as err:
        raise UserError(f"cannot resolve '{hosts[0]}', the first host of the SLURM node list '{nodelist}': "
                        f"{err.strerror}") from err
    return hosts[0]


def _srun_rendezvous() -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT of the tasks of an srun step: the first host of the job and a
    port from its id. Values already in the environment win."""
    env = os.environ
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_master_port(int(env["SLURM_JOB_ID"])))}


def _single_process_rendezvous() -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def _set_group_timeout(seconds: float) -> timedelta:
    """Every process group of this process, the ones made later included, waits at most ``seconds``
    for a collective. A group made without a timeout takes torch's module default, not the world
    group's (torch/distributed/distributed_c10d.py:836-849, 5982-5983), and DeepSpeed makes one so,
    its clone of the world group that carries the gradient all-reduce (deepspeed/utils/groups.py:734)."""
    timeout = timedelta(seconds=seconds)
    torch_dist.distributed_c10d.default_pg_timeout = timeout
    torch_dist.distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def adopt_launcher_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as the launcher exported them, or
    derived for an srun task or a lone process. A job's first step: a SLURM node list that does not
    resolve is reported at once, before any other work."""
    if "RANK" not in os.environ:
        rendezvous = _srun_rendezvous() if in_srun_step() else _single_process_rendezvous()
        os.environ.update({**rank_env(), **rendezvous})


def _shm_buffer(rank: int) -> str:
    """The shared-memory file of this rank that DeepSpeed's CPU allreduce creates at init,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
    (comm/torch.py:220 passes the global rank; ops/csrc/cpu/comm/shm.cpp:348-368), and never unlinks
    (its shared_close is never called):
    about 64 MiB of RAM per rank per run, left behind until reboot."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def _remove_shm_buffer(path: str) -> None:
    """At exit: every other rank mapped this file at init, so removing its name is safe."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def init_distributed(device: str = "auto", deepspeed_comm: bool = True,
                     collective_timeout: float | None = None) -> Dist:
    """Join the process group set up by torchrun / the deepspeed launcher / srun (or run alone).

    Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Tasks of an
    ``srun`` step get them from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list. A
    plain ``python launcher/train.py`` has none of them: it becomes rank 0 of 1 on a free local port.
    ``deepspeed_comm=False`` joins through torch.distributed alone, for jobs without a DeepSpeed
    engine (evaluation): no DeepSpeed import, no communication op to build.
    ``collective_timeout`` (seconds) bounds every collective (torch's default: 30 min for gloo, 10 for NCCL).
    """
    adopt_launcher_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        # DeepSpeed takes LOCAL_RANK as the CUDA device index (deepspeed/runtime/engine.py:1017 and
        # :1943 set_device(local_rank), comm/torch.py:280 device_id, runtime/zero/partition_parameters.py
        # :1138): under srun --gpus-per-task=1 a task with SLURM_LOCALID 1 sees one GPU, index 0.
        # So DeepSpeed is told the index chosen here; Dist.local_rank keeps the rank on the node.
        os.environ["LOCAL_RANK"] = str(chosen.index)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    kwargs = {} if collective_timeout is None else {"timeout": _set_group_timeout(collective_timeout)}
    if deepspeed_comm:
        # DeepSpeed JIT-compiles ops into TORCH_EXTENSIONS_DIR; one folder per environment keeps
        # two virtualenvs on one host from rebuilding each other's ops at every start.
        if os.access(sys.prefix, os.W_OK):
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        import deepspeed  # slow import: only when a job really starts

        # On CPU ranks DeepSpeed builds and loads its shared-memory op here (comm/torch.py:47-53), and
        # prints "... built successfully" on every rank, every start.
        announce_builds(["ShareMemCommBuilder"], show=rank == 0)
        with library_prints():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
        if chosen.type == "cpu":
            atexit.register(_remove_shm_buffer, _shm_buffer(rank))
    else:
        torch_dist.init_process_group(backend=backend, **kwargs)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


# Signs that this node was given GPUs, whatever torch can see. Not CUDA_VISIBLE_DEVICES: the
# deepspeed launcher sets it for CPU ranks too (deepspeed/accelerator/cpu_accelerator.py:363).
_GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "NVIDIA_VISIBLE_DEVICES")


def gpus_expected() -> str | None:
    """Why this machine should have a usable GPU (for the error message), or None."""
    for name in _GPU_ENV:
        value = os.environ.get(name, "").strip().lower()
        if value not in ("", "0", "none", "void"):
            return f"{name}={os.environ[name]}"
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return f"{devices[0]} exists" if devices else None


def choose_device(requested: str, local_rank: int) -> torch.device:
    """The one device choice of every medgpt program: ``auto`` (this rank's GPU if torch sees one,
    else the CPU, unless the machine should have GPUs), ``cuda`` or ``cpu``."""
    if requested not in DEVICES:
        raise UserError(f"device '{requested}' is unknown; use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:  # srun --gpus-per-task=1 / one GPU per container: each task's own GPU
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise UserError(f"local rank {local_rank} on this node but only {count} GPUs are visible; start at "
                            f"most {count} ranks per node (--nproc_per_node / --num_gpus)")
        return torch.device("cuda", local_rank)
    build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda
                                               else "a CPU-only build")
    if requested == "cuda":
        raise UserError(f"--device cuda, but torch sees no GPU ({build}); install a CUDA build of torch that "
                        "matches the driver, or pass --device cpu")
    reason = gpus_expected()
    if reason:
        raise UserError(f"this machine should have GPUs ({reason}) but torch sees none ({build}); install a "
                        "CUDA build of torch that matches the driver (nvidia-smi shows its CUDA version), or "
                        "pass --device cpu to run on the CPU on purpose")
    return torch.device("cpu")


def _is_collective_timeout(err: BaseException) -> bool:
    """gloo: RuntimeError "Timed out waiting 20000ms for recv operation" (gloo/transport/tcp/unbound_buffer.cc);
    NCCL: DistBackendError (a RuntimeError) "Watchdog caught collective operation timeout"."""
    return isinstance(err, RuntimeError) and re.search(r"timed out|timeout", str(err), re.IGNORECASE) is not None


def exit_on_collective_timeout(dist: Dist, seconds: float, last_step: Callable[[], int]) -> None:
    """From now on, a collective that times out ends this rank with one line naming the step and
    STALLED_EXIT; the launcher then ends the other ranks. Any other uncaught error keeps its traceback.

    An uncaught exception reaches sys.excepthook, so the training loop needs no wrapper. os._exit:
    a normal exit with a gloo group still open aborts the interpreter ("terminate called without an
    active exception", exit -6), and the group cannot be destroyed while a collective is pending.
    """
    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if not _is_collective_timeout(err):
            sys.__excepthook__(kind, err, tb)
            return
        detail = str(err).splitlines()[0]
        print(f"medgpt: error: rank {dist.rank}: a collective did not complete within {seconds:g} s after step "
              f"{last_step()}: another rank stalled or died (stopped, deadlocked, or its node failed); "
              f"exiting with {STALLED_EXIT} ({detail})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(STALLED_EXIT)

    sys.excepthook = hook
