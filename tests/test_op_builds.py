"""The line before DeepSpeed compiles an op on first start: which ops a run builds, and whether one is
already built, checked against a real extensions folder and an empty one (no 2-minute build)."""
import os
import sys

import pytest

from conftest import REPO
from medgpt.config import Config
from medgpt.ds_config import load_ds_config, resolve_ds_config
from medgpt.op_builds import optimizer_builders


def resolved(name: str, **optimizer_params: object) -> dict:
    raw = load_ds_config(str(REPO / "ds_configs" / name))
    raw["optimizer"]["params"].update(optimizer_params)
    return resolve_ds_config(raw, Config(), world_size=2, total_steps=10, hidden_size=64, on_gpu=False)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_only_the_offload_configs_build_an_optimizer_op(name):
    # medgpt gives DeepSpeed torch's AdamW, which needs no build, except under ZeRO-Offload.
    assert optimizer_builders(resolved(name)) == (["CPUAdamBuilder"] if "offload" in name else [])


def test_a_json_that_turns_torch_adam_off_builds_fused_adam():
    assert optimizer_builders(resolved("zero2.json", torch_adam=False)) == ["FusedAdamBuilder"]


def medgpt_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("medgpt:")]


@pytest.mark.e2e  # imports DeepSpeed and loads (on first use: compiles) its shared-memory op
def test_an_op_needs_a_build_in_an_empty_extensions_folder_only(tmp_path, monkeypatch, capsys):
    from deepspeed.accelerator import get_accelerator

    from medgpt.op_builds import announce_builds, needs_build

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # what every CPU run builds
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert needs_build(builder)
    announce_builds(["ShareMemCommBuilder"], show=True)
    assert medgpt_lines(capsys.readouterr().out) == [
        "medgpt: first start in this environment: DeepSpeed is compiling its shared-memory communication op "
        f"(CPU ranks) into {tmp_path / builder.name}; this takes a few minutes and happens once per environment"]
    # The environment's own folder, as medgpt.distributed sets it: after DeepSpeed's load it is built.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    builder.load()
    assert not needs_build(builder)
    announce_builds(["ShareMemCommBuilder"], show=True)
    assert medgpt_lines(capsys.readouterr().out) == []
