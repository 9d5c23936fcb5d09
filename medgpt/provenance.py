"""Where a run's numbers come from: the libraries' versions, medgpt's own source (git commit, and
whether the tree had uncommitted changes), the hosts and the devices. Recorded at every start in the
checkpoints' medgpt.json, config.yaml, TensorBoard's text and the model card; launcher/report.py
carries it into report.json."""
from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from medgpt.distributed import Dist

PACKAGES = ("medgpt", "torch", "transformers", "deepspeed", "datasets", "peft")
REPO = Path(__file__).resolve().parents[1]


def library_versions() -> dict[str, str | None]:
    """Each package's installed version (None: not installed), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_version(repo: Path = REPO) -> dict[str, Any] | None:
    """medgpt's git commit and whether tracked files differ from it; None outside a git checkout (an
    installed wheel) or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, as /proc/cpuinfo names it
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def run_provenance(dist: Dist) -> dict[str, Any]:
    """Collective (every rank calls it): the same answer on every rank."""
    ranks = dist.all_gather_objects((socket.gethostname(), device_name(dist.device)))
    return {"versions": library_versions(), "source": source_version(),
            "hosts": sorted({host for host, _ in ranks}),
            "devices": dict(Counter(f"{dist.device.type}: {name}" for _, name in ranks)),
            "world_size": dist.world_size}
