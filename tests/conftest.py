"""Shared helpers: real subprocesses running the real entry point on the real shared data."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from medgpt.distributed import free_port
from medgpt.errors import USER_ERROR_EXIT

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ORI_JSON = SHARED / "pubmedqa" / "ori_pqal.json"
PARQUET_DIR = SHARED / "pubmedqa" / "hf" / "pqa_labeled"
GROUND_TRUTH = SHARED / "pubmedqa" / "test_ground_truth.json"
TOKENIZER = SHARED / "gpt2-tokenizer"
TINY_MODEL = REPO / "configs" / "models" / "tiny.json"
TRAIN_PY = str(REPO / "launcher" / "train.py")
EVALUATE_PY = str(REPO / "launcher" / "evaluate.py")
PROGRAMS = REPO / "tests" / "programs"  # helper programs the tests run in processes of their own


# pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml) runs one group at a time on a worker: a
# file's tests share its module fixtures, so a file is a group; files that share session runs
# join one group; the SLURM tests join one, so one SLURM cluster runs at a time.
SHARED_GROUPS = {"test_checkpoint.py": "checkpoint-runs", "test_checkpoint_integrity.py": "checkpoint-runs"}
# Each group's worker seconds in a full run (a fresh clone, 2 workers on 2 cores, AMD EPYC,
# 2026-12-03, run F, from MEDGPT_TEST_TIMES). Groups start longest first (`--no-loadscope-reorder` keeps
# this order; xdist's own puts the most *tests* first): the last group to start is a short one, so
# neither worker idles long at the end. Unlisted groups (seconds or less): last.
GROUP_SECONDS: dict[str, float] = {
    "checkpoint-runs": 979, "test_signals.py": 542, "test_scale.py": 498, "test_gpu_readiness.py": 355,
    "test_evaluate.py": 338, "slurm": 290, "test_docs.py": 224, "test_train.py": 187, "test_best.py": 132,
    "test_lora.py": 119, "test_sweep.py": 113, "test_bad_input.py": 102, "test_bench.py": 92,
    "test_disk_full.py": 68, "test_packing.py": 64, "test_report.py": 58, "test_pqa_artificial.py": 42,
    "netns": 36, "test_run_lock.py": 33, "test_safe_load.py": 28, "test_plan.py": 20,
}


def xdist_group(item: pytest.Item) -> str:
    if item.get_closest_marker("slurm"):
        return "slurm"
    if item.get_closest_marker("netns"):
        return "netns"
    return SHARED_GROUPS.get(item.path.name, item.path.name)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection (_pytest/mark/__init__.py)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A SLURM, network-namespace or tmpfs test starts real jobs: it is an e2e test too, so that
    `-m "not e2e"` leaves it out. Each test gets its xdist group; groups run longest first."""
    for item in items:
        if any(item.get_closest_marker(name) for name in ("slurm", "netns", "tmpfs")):
            item.add_marker(pytest.mark.e2e)
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
    items.sort(key=lambda item: -GROUP_SECONDS.get(xdist_group(item), 0.0))  # stable: a group's order kept


UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """In an xdist worker with --dist loadgroup, every test id must carry its group (xdist appends
    "@<group>"); without, the scheduler spreads a group's tests over both workers and, e.g., two
    SLURM clusters hand out the same job ids and rendezvous ports at once. Then every test fails
    with the reason (an error raised here reaches the console as an INTERNALERROR without its text)."""
    if not session.config.getoption("loadgroup", default=False):  # set in xdist workers only
        return
    ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid.rsplit("]", 1)[-1]]
    if ungrouped:
        session.config.stash[UNGROUPED] = (
            f"pytest-xdist did not group {len(ungrouped)} test(s) (e.g. {ungrouped[0]}): pytest {pytest.__version__} "
            "and this pytest-xdist do not work together; install the versions pyproject.toml's dev extra allows")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if UNGROUPED in item.config.stash:
        pytest.fail(item.config.stash[UNGROUPED], pytrace=False)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """MEDGPT_TEST_TIMES=<file>: each phase's seconds (setup, call, teardown) appended as it ends, by
    the process that ran it: where a suite's time goes even when a run is cut short. One line each:
    seconds, phase, outcome, then the test id (last: ids hold spaces)."""
    path = os.environ.get("MEDGPT_TEST_TIMES")
    if path and getattr(report, "node", None) is None:  # xdist's controller gets a worker's report with .node
        with open(path, "a") as out:
            out.write(f"{report.duration:.2f} {report.when} {report.outcome} {report.nodeid}\n")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-data cache for the whole session (tokenize once, like real runs)."""
    return tmp_path_factory.mktemp("medgpt-cache")


def tiny_args(output_dir: Path, cache_dir: Path, **overrides: object) -> list[str]:
    """Flags for a fast fp32 run of the tiny model on the shared data."""
    flags: dict[str, object] = dict(
        model=TINY_MODEL, tokenizer=TOKENIZER, data=ORI_JSON, cache_dir=cache_dir, output_dir=output_dir,
        precision="fp32", dropout=0.0, seq_len=384, micro_batch_size=2, grad_accum=2, max_steps=10,
        lr=1e-3, warmup_steps=2, log_every=1, eval_every=5, ds_config=REPO / "ds_configs" / "zero0.json",
    )
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def launch_command(launcher: str = "python", nproc: int = 1, script: str = TRAIN_PY,
                   master_port: int | None = None) -> list[str]:
    """The command line that starts a launcher script (launcher/train.py unless told) as a user
    would: plain python, torchrun or the deepspeed launcher."""
    bindir = Path(sys.executable).parent
    port = str(master_port or free_port())
    if launcher == "python":
        return [sys.executable, script]
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script]
    raise ValueError(launcher)


def launch_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def launch(args: list[str], launcher: str = "python", nproc: int = 1, timeout: int = 600,
           env: dict[str, str] | None = None, script: str = TRAIN_PY,
           master_port: int | None = None) -> subprocess.CompletedProcess:
    """Run a launcher script to the end (see launch_command)."""
    return subprocess.run(launch_command(launcher, nproc, script, master_port) + args, cwd=REPO,
                          env=launch_env(env), capture_output=True, text=True, timeout=timeout)


@contextmanager
def running(args: list[str], log: Path, launcher: str = "python", nproc: int = 1) -> Iterator[subprocess.Popen]:
    """Start a training run in the background (in its own session, so a test can send a signal to the
    whole group like Ctrl-C does), output into ``log``. On the way out, whatever of it is left is
    killed, and the DeepSpeed shared-memory files of its rendezvous port are removed."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(launch_command(launcher, nproc, master_port=port) + args, cwd=REPO,
                                env=launch_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    output_dir = args[args.index("--output_dir") + 1]
    try:
        yield proc
    finally:
        for pid in alive(run_pids(output_dir) | {proc.pid}):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # SIGKILL ends stopped processes too
        proc.wait(timeout=60)
        remove_shm_buffers(port)


def shm_buffers(port: int) -> list[Path]:
    """The DeepSpeed shared-memory buffers of one job, named ..._<uid>_<addr>_<port>_<rank>
    (deepspeed/ops/csrc/cpu/comm/shm.cpp:348-366): a rank that exits normally removes its own
    (medgpt.distributed); a killed one leaves it behind."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def remove_shm_buffers(port: int) -> None:
    """The buffers that killed ranks of one job left behind."""
    for leftover in shm_buffers(port):
        leftover.unlink(missing_ok=True)


def wait_for_first_step(proc: subprocess.Popen, output_dir: Path, timeout: float = 600) -> None:
    """Block until rank 0 has logged a training step (then every rank is in the loop)."""
    deadline = time.monotonic() + timeout
    while not list((output_dir / "tensorboard").glob("events*")):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first step"
        assert time.monotonic() < deadline, "no training step logged in time"
        time.sleep(0.2)


def run_pids(output_dir: Path | str) -> set[int]:
    """Every process of a run, launchers and ranks: all hold its --output_dir on their command line."""
    needle = f"\0{output_dir}\0".encode()
    pids = set()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if needle in b"\0" + (proc_dir / "cmdline").read_bytes():
                pids.add(int(proc_dir.name))
        except OSError:
            pass  # gone meanwhile
    return pids - {os.getpid()}


def rank_pid(output_dir: Path | str, local_rank: int) -> int:
    """A rank of a run: the launchers' environment has no LOCAL_RANK, the ranks' has."""
    for pid in run_pids(output_dir):
        try:
            if f"LOCAL_RANK={local_rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no rank with LOCAL_RANK={local_rank} under {output_dir}")


def alive(pids: set[int]) -> set[int]:
    """The pids still running (a zombie has ended; only its exit status waits to be collected)."""
    running_pids = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running_pids.add(pid)
    return running_pids


def check_ok(proc: subprocess.CompletedProcess) -> None:
    output = f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"


ERROR = "medgpt: error: "
# The caller's exit code for bad input: torchrun turns any failed worker into its own exit 1 (ChildFailedError,
# with the worker's exit code 2 in its report); the deepspeed launcher passes the worker's code on.
BAD_INPUT_EXIT = {"python": USER_ERROR_EXIT, "torchrun": 1, "deepspeed": USER_ERROR_EXIT}


def error_lines(stderr: str) -> list[str]:
    """A program's `medgpt: error:` lines, that prefix removed."""
    return [line.removeprefix(ERROR) for line in stderr.splitlines() if line.startswith(ERROR)]


def refused(proc: subprocess.CompletedProcess, launcher: str = "python") -> list[str]:
    """Check that a program refused its input as every medgpt program does: exit code 2 (as the launcher
    passes it on), no traceback through medgpt's own code, none at all when run directly (a launcher's
    report of a failed worker is its own); return its error lines."""
    tail = proc.stderr[-3000:]
    assert proc.returncode == BAD_INPUT_EXIT[launcher], tail
    for code in ("medgpt", "launcher"):
        assert f'File "{REPO / code}' not in proc.stderr, tail
    if launcher == "python":
        assert "Traceback" not in proc.stderr, tail
    if launcher == "torchrun":
        assert re.search(r"exitcode\s*: 2 ", proc.stderr), tail
    return error_lines(proc.stderr)


def snapshot(path: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime under path (a file: itself), to show that a refused
    run left what the user had untouched."""
    if not path.exists():
        return {}
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in entries}


def read_scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def checkout_commit() -> dict | None:
    """This checkout's commit and dirtiness as git reports them (None: not a git checkout)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())}


def tensorboard_text(output_dir: Path, tag: str) -> str:
    """The texts a run logged under ``tag``, joined, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return "\n".join(value.decode() for event in acc.Tensors(f"{tag}/text_summary")
                     for value in event.tensor_proto.string_val)


def session_groups(logdir: Path) -> dict[str, tuple[dict, dict[str, dict[str, float]]]]:
    """What TensorBoard's HParams view lists: group -> (its hparams, {session: last metric values}), read
    by the plugin's own handler."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    plugin = backend_context.Context(base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir))))
    request = api_pb2.ListSessionGroupsRequest(allowed_statuses=[api_pb2.STATUS_UNKNOWN], start_index=0,
                                               slice_size=100, aggregation_type=api_pb2.AGGREGATION_AVG)
    response = list_session_groups.Handler(context.RequestContext(), plugin, "", request).run()
    return {group.name: ({k: getattr(v, v.WhichOneof("kind")) for k, v in group.hparams.items()},
                         {s.name: {m.name.tag: m.value for m in s.metric_values} for s in group.sessions})
            for group in response.session_groups}


REFERENCE_STEPS = 20


@pytest.fixture(scope="session")
def reference_args(data_cache: Path):
    """Flags of the 2-rank run that the SLURM and multi-host tests compare their losses with."""
    def make(output_dir: Path) -> list[str]:
        return tiny_args(output_dir, data_cache, max_steps=REFERENCE_STEPS, eval_every=0)
    return make


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory: pytest.TempPathFactory, reference_args) -> Path:
    """1 node x 2 ranks under torchrun: the output_dir of the run every multi-node layout must match."""
    out = tmp_path_factory.mktemp("reference-2ranks")
    check_ok(launch(reference_args(out), launcher="torchrun", nproc=2))
    return out


# --- Checkpoint runs shared by tests/test_checkpoint.py and tests/test_checkpoint_integrity.py.
STEPS = 8


def ckpt_args(out: Path, cache: Path, stage: int, **overrides: object) -> list[str]:
    flags: dict[str, object] = dict(max_steps=STEPS, save_every=2, keep_last=0, eval_every=0,
                                    ds_config=REPO / "ds_configs" / f"zero{stage}.json")
    return tiny_args(out, cache, **{**flags, **overrides})


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, data_cache: Path):
    """Uninterrupted 8-step runs on 2 ranks under torchrun, one per ZeRO stage and dropout, saving
    every 2 steps (made on first use and shared by the tests; tests that change a run work on a copy)."""
    made: dict[tuple[int, float], Path] = {}

    def get(stage: int, dropout: float = 0.0) -> Path:
        if (stage, dropout) not in made:
            out = tmp_path_factory.mktemp(f"zero{stage}-dropout{dropout}")
            check_ok(launch(ckpt_args(out, data_cache, stage, dropout=dropout), launcher="torchrun", nproc=2))
            made[stage, dropout] = out
        return made[stage, dropout]
    return get


def stopped_at(run: Path, dest: Path, step: int = 4, older: tuple[int, ...] = ()) -> Path:
    """A copy of a run as it was right after its step-N checkpoint (and the older ones named):
    what a stopped run leaves."""
    for kept in (*older, step):
        shutil.copytree(run / "checkpoints" / f"step{kept}", dest / "checkpoints" / f"step{kept}")
    (dest / "checkpoints" / "latest").write_text(f"step{step}")
    shutil.copytree(run / "tensorboard", dest / "tensorboard")  # holds steps 1-8: those after N get purged
    return dest


def losses(out: Path) -> list[tuple[int, float]]:
    return read_scalars(out)["train/loss"]


def latest_step(out: Path) -> int:
    """The step of the checkpoint a run's `latest` names."""
    return int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
