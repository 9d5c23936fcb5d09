"""DeepSpeed's C++ ops compiled on first use: which ones a run makes DeepSpeed build, and whether the
build is already cached, so that the first start in an environment says why it is silent for minutes.

DeepSpeed loads an op installed with it (``DS_BUILD_OPS=1``) as is, and otherwise JIT-compiles it
with torch's ``cpp_extension.load`` into ``<TORCH_EXTENSIONS_DIR>/<op name>/<op name>.so``
(deepspeed/ops/op_builder/builder.py:549-567 load, :568-625 jit_load); ninja rebuilds it there when
a source is newer than the library. A later start finds it and only loads it (a second or two).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# What each builder compiles, in words (DeepSpeed's builder class names).
DESCRIPTIONS = {
    "ShareMemCommBuilder": "shared-memory communication op (CPU ranks)",
    "CPUAdamBuilder": "CPU Adam op (ZeRO-Offload's optimizer)",
    "FusedAdamBuilder": "FusedAdam op",
}


def optimizer_builders(ds_config: dict[str, Any]) -> list[str]:
    """The op the engine builds for this (resolved) DeepSpeed config's optimizer, as
    runtime/engine.py:2377-2409 get_optimizer_configuration chooses: torch's AdamW needs none; otherwise
    DeepSpeedCPUAdam under ZeRO-Offload, FusedAdam without it."""
    optimizer = ds_config.get("optimizer", {})
    if optimizer.get("type", "").lower() not in ("adam", "adamw") or optimizer.get("params", {}).get("torch_adam"):
        return []
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return ["CPUAdamBuilder" if offload in ("cpu", "nvme") else "FusedAdamBuilder"]


def jit_library(builder: Any) -> Path:
    """Where torch's JIT build puts the op's library (torch/utils/cpp_extension.py _get_build_directory,
    which honours TORCH_EXTENSIONS_DIR, and _jit_compile)."""
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

    return Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}{LIB_EXT}"


def needs_build(builder: Any) -> bool:
    """True if loading the op will compile it: not installed with DeepSpeed, and no library in the
    extensions folder at least as new as its sources. Reads files only: running ninja to ask (even
    ``ninja -n``) can rewrite the folder's build log."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):
        return False
    library = jit_library(builder)
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(Path(builder.deepspeed_src_path(source)).stat().st_mtime > built for source in builder.sources())


def announce_builds(builder_names: list[str], show: bool) -> None:
    """One line per op of ``builder_names`` that DeepSpeed is about to compile, where ``show`` (rank 0:
    it speaks for the job; another node without a shared extensions folder builds silently)."""
    if not show:
        return
    from deepspeed.accelerator import get_accelerator

    for name in builder_names:
        builder = get_accelerator().create_op_builder(name)  # None: not an op of this accelerator
        if builder is not None and needs_build(builder):
            print(f"medgpt: first start in this environment: DeepSpeed is compiling its {DESCRIPTIONS[name]} "
                  f"into {jit_library(builder).parent}; this takes a few minutes and happens once per "
                  "environment", flush=True)
