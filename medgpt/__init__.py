"""medgpt: fine-tune GPT-2 on PubMedQA with DeepSpeed ZeRO."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType


class _NoMlflowForDeepSpeedAutotuner(importlib.abc.MetaPathFinder):
    """`import deepspeed` imports its autotuner, which imports mlflow when installed
    (deepspeed/autotuning/autotuner.py:30-34, reached from deepspeed.runtime.config) only for
    ``Autotuner.tune``, which medgpt never runs: 1.2 s of every rank's start on an idle 2-core machine
    (`python -X importtime`). That one import is answered "not installed" (the autotuner catches it and
    sets has_mlflow False); mlflow itself stays importable, for --report_to mlflow."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name == "mlflow" and _importer_name() == "deepspeed.autotuning.autotuner":
            raise ModuleNotFoundError("mlflow is not imported for DeepSpeed's autotuner (medgpt/__init__.py)",
                                      name=name)
        return None


def _importer_name() -> str | None:
    """The module whose code runs the import statement being resolved (the first frame outside the
    import machinery)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get("__name__")


sys.meta_path.insert(0, _NoMlflowForDeepSpeedAutotuner())
