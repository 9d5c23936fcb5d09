"""What importing medgpt's libraries costs each process it starts (medgpt/__init__.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.e2e  # imports DeepSpeed: seconds
def test_deepspeed_import_skips_mlflow_which_stays_importable():
    code = """
import json, sys
import medgpt, deepspeed
from deepspeed.autotuning import autotuner
before = "mlflow" in sys.modules
import mlflow
print(json.dumps({"mlflow_before": before, "autotuner_has_mlflow": autotuner.has_mlflow,
                  "mlflow_after": hasattr(mlflow, "start_run")}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"mlflow_before": False, "autotuner_has_mlflow": False,
                                                        "mlflow_after": True}
