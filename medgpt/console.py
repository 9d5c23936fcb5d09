"""What a medgpt process prints: its own lines, not the libraries' chatter.

Every launcher calls :func:`quiet_libraries` right after parsing its command line, before it imports
torch, DeepSpeed, transformers or datasets. Quiet (the default) lowers third-party output to errors
through the libraries' own switches: log levels, progress-bar switches and warning filters by
category and module. ``--verbose`` leaves every library at its defaults. medgpt's own lines are
prints, on rank 0 (errors on every rank), so none of this touches them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Off switches of third-party progress bars. TQDM_DISABLE is tqdm's default for `disable` (tqdm/std.py
# envwrap("TQDM_")): a bar created with an explicit disable=, as medgpt's are, keeps it; bare bars such
# as zero_to_fp32's "Loading checkpoint shards" are off. datasets and huggingface_hub (the bars of
# transformers' save/load) pass disable= themselves, from these switches.
PROGRESS_BARS_OFF = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

VERBOSE_HELP = ("also print the libraries' own info, warnings and progress bars (DeepSpeed, transformers, "
                "datasets); off: their errors only")

_quiet = False


def quiet_libraries(verbose: bool) -> None:
    """Third-party libraries report errors only in this process (and its data-loader workers)."""
    global _quiet
    if verbose:
        return
    _quiet = True
    for name, value in PROGRESS_BARS_OFF.items():
        os.environ.setdefault(name, value)  # a user's own setting wins
    # One threshold for every library logger (DeepSpeed, transformers, datasets, huggingface_hub, torch):
    # DeepSpeed sets its logger's level itself when imported (utils/logging.py:40-44) and warns while
    # importing (accelerator/real_accelerator.py:213), so a level set on its logger beforehand would be
    # overwritten; the logging module's own threshold is not. medgpt itself does not log, it prints.
    logging.disable(logging.WARNING)
    # One library's deprecation notices about another (DeepSpeed calling a torch.distributed function
    # torch deprecates) are for their authors; medgpt's own stay visible.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!medgpt\b)")


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Mute stdout around a library call that reports its progress with print() and has no switch for
    it (DeepSpeed's zero_to_fp32 and its communication-op loader), unless verbose.
    Its failures still surface: they are exceptions."""
    if not _quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield
