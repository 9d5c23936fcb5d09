"""Put on PYTHONPATH, this runs at every interpreter's start: the process dies (SIGKILL, no cleanup)
halfway through writing the step-4 checkpoint."""
import os
import signal
from typing import Any

import torch

_save = torch.save


def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
    if "step4" in str(f) and "optim_states" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)


torch.save = save
