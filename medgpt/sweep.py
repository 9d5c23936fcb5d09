"""Running a sweep (launcher/sweep.py; what runs: medgpt.sweep_plan).

Locally the runs go one after another, each under the chosen launcher, its output in
``<sweep>/logs/<name>.log`` (appended to by a rerun). A run that ends records its exit code in
``<sweep>/status/<name>.json``; a rerun of the sweep skips the runs recorded as finished (exit 0)
and starts the others with ``--resume auto``: an interrupted run resumes from its checkpoint, and
one that had trained all its steps completes only what its end left undone (test scoring, export).
A failed run does not stop the sweep: the runs are independent, and a night's sweep should not
wait on one bad fold. SIGINT/SIGTERM/SIGUSR1 to the sweep go to the running run (its ranks save
and exit 75) and the sweep starts no more runs. A run is a child that dies with the sweep: if the
sweep is killed (even SIGKILL), its running run gets SIGTERM (Linux's parent-death signal), saves
and stops, so a rerun never meets a run of the old sweep still training; and a rerun refuses to
start while any of its runs' folders is locked by a running run (medgpt.run_lock).

On SLURM the runs are one job array, one task a run, each a normal job of slurm/train.sbatch or
train_deepspeed.sbatch that finds its run's flags through MEDGPT_SWEEP (slurm/common.sh), with the
scripts' preemption and requeue (a requeued task is its own job: it resumes only itself); the
report job follows with ``--dependency=afterok``.
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType

from medgpt.errors import PREEMPTED_EXIT, UserError
from medgpt.run_lock import lock_holder
from medgpt.sweep_plan import Run, Sweep, SweepRequest

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "launcher" / "train.py"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SWEEP_FAILED_EXIT = 1
# Past medgpt's stop_timeout (25 s: step + checkpoint) and the launchers' 30 s grace.
GROUP_EXIT_TIMEOUT = 120.0


def launch_command(launcher: str, nproc: int) -> list[str]:
    """The command that starts launcher/train.py (its flags follow) under ``launcher``."""
    if launcher == "python":
        return [sys.executable, str(TRAIN_PY)]
    from medgpt.distributed import free_port  # imports torch: only once a run starts

    port = str(free_port())  # runs of other sweeps (or users) on this host keep their ports
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, str(TRAIN_PY)]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
            str(TRAIN_PY)]


class StopForwarder:
    """While the sweep runs: a stop signal is passed to the running run's process group (its
    launcher and ranks, which save and exit) and remembered, so that no further run starts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._run: subprocess.Popen | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopForwarder:
        for signum in STOP_SIGNALS:
            self._before[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        print(f"sweep: {self.signal} received: the running run saves and stops; no further run starts", flush=True)
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self._run is not None and self._run.poll() is None:
            os.killpg(self._run.pid, signum)

    def wait(self, proc: subprocess.Popen) -> int:
        """Wait for a run started in a session of its own (a terminal's Ctrl-C reaches only the sweep)."""
        self._run = proc
        if self.signal:  # arrived while it was starting
            self._forward(signal.Signals[self.signal])
        code = proc.wait()
        wait_for_group(proc.pid)
        self._run = None
        return code


def group_members(pgid: int) -> list[int]:
    """The live processes (not zombies) of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def wait_for_group(pgid: int, timeout: float = GROUP_EXIT_TIMEOUT) -> None:
    """Wait until a run's last process has ended: the `deepspeed` command dies of a SIGTERM at once
    while its ranks still save (medgpt/errors.py), and the next run (or a rerun) must not start
    before they have."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(pgid):
        print(f"sweep: warning: processes {group_members(pgid)} of the run are still alive after {timeout:.0f} s",
              flush=True)


def check_no_run_in_progress(sweep: Sweep) -> None:
    """Refuse to start while a run of this sweep is still training (an earlier sweep's, or one
    started by hand): two writers would share its folder."""
    held = [(run, holder) for run in sweep.runs if (holder := lock_holder(run.output_dir))]
    if held:
        raise UserError(*[f"run {run.name} is still running ({holder}) in {run.output_dir}; wait for it to end "
                          "(or stop it), then run the sweep again" for run, holder in held])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_the_sweep() -> None:
    """In a run's process, before it execs its launcher: SIGTERM when the sweep ends, however it ends
    (the launcher passes it to the ranks, which save and exit 75)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def status_file(sweep: Sweep, run: Run) -> Path:
    return Path(sweep.sweep_dir) / "status" / f"{run.name}.json"


def log_file(sweep: Sweep, run: Run) -> Path:
    return Path(sweep.sweep_dir) / "logs" / f"{run.name}.log"


def finished_before(sweep: Sweep, run: Run) -> bool:
    """Recorded as finished (exit 0) by an earlier sweep, and its output folder still there."""
    try:
        code = json.loads(status_file(sweep, run).read_text())["exit_code"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return code == 0 and (Path(run.output_dir) / "config.yaml").is_file()


def run_one(sweep: Sweep, run: Run, command: list[str], stop: StopForwarder) -> int:
    """One run to its end, its output appended to its log; its exit code recorded."""
    log = log_file(sweep, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"=== medgpt sweep, {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command + run.args)}\n")
        out.flush()
        proc = subprocess.Popen(command + run.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_the_sweep)
    code = stop.wait(proc)
    record = status_file(sweep, run)
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps({"exit_code": code, "seconds": round(time.monotonic() - started, 1),
                                  "command": command}) + "\n")
    return code


def run_local(sweep: Sweep, request: SweepRequest) -> int:
    """Every run not finished before, one after another; the sweep's exit code (module docstring)."""
    codes: dict[str, int] = {}
    total = len(sweep.runs)
    with StopForwarder() as stop:
        for i, run in enumerate(sweep.runs, 1):
            tag = f"sweep: [{i}/{total}] {run.name}"
            if finished_before(sweep, run):
                print(f"{tag}: finished before, skipped", flush=True)
                codes[run.name] = 0
                continue
            if stop.signal:
                break
            print(f"{tag}: running ({request.launcher} x {request.nproc}), log {log_file(sweep, run)}", flush=True)
            started = time.monotonic()
            codes[run.name] = run_one(sweep, run, launch_command(request.launcher, request.nproc), stop)
            outcome = "done" if codes[run.name] == 0 else f"{'stopped' if stop.signal else 'FAILED'} " \
                f"(exit {codes[run.name]})"
            print(f"{tag}: {outcome} after {time.monotonic() - started:.0f} s", flush=True)
    return summarize(sweep, codes, stop.signal)


def summarize(sweep: Sweep, codes: dict[str, int], stopped_by: str | None) -> int:
    """Print what the sweep did; return 0 (all finished), 75 (stopped on a signal) or 1 (runs failed)."""
    done = [name for name, code in codes.items() if code == 0]
    failed = [run for run in sweep.runs if codes.get(run.name, 0) != 0]
    left = [run.name for run in sweep.runs if run.name not in codes]
    print(f"sweep: {len(done)} of {len(sweep.runs)} runs finished ({sweep.sweep_dir}/runs)", flush=True)
    if stopped_by:
        print(f"sweep: stopped by {stopped_by}; not started: {', '.join(left) or 'none'}. "
              "Run the same command again to resume", flush=True)
        return PREEMPTED_EXIT
    for run in failed:
        print(f"sweep: FAILED {run.name} (exit {codes[run.name]}): see {log_file(sweep, run)}", flush=True)
    if failed:
        print("sweep: run the same command again to retry the failed runs (finished runs are skipped)", flush=True)
        return SWEEP_FAILED_EXIT
    return 0


def sbatch_script(launcher: str) -> str:
    return "slurm/train_deepspeed.sbatch" if launcher == "deepspeed" else "slurm/train.sbatch"


def check_slurm() -> None:
    """SLURM mode submits from the repository root (the job scripts run there): checked up front."""
    problems = []
    if shutil.which("sbatch") is None:
        problems.append("--slurm: sbatch is not on PATH; run on a SLURM login node")
    if Path.cwd().resolve() != REPO:
        problems.append(f"--slurm: run launcher/sweep.py from the repository root ({REPO}): the jobs run "
                        "there and read relative paths from it")
    if problems:
        raise UserError(*problems)


def sbatch(options: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *options], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job ({' '.join(options)}): {' '.join(proc.stderr.split())}")
    return int(proc.stdout.strip().split(";")[0])


def submit_slurm(sweep: Sweep, request: SweepRequest) -> tuple[int, int]:
    """The runs as one job array (task i: run i of sweep.json), then the report job after all of them
    succeeded (a failed task cancels it: --kill-on-invalid-dep). Returns both job ids."""
    name = Path(sweep.sweep_dir).name
    logs = Path(sweep.sweep_dir) / "logs"
    logs.mkdir(exist_ok=True)
    python = os.environ.get("MEDGPT_PYTHON", sys.executable)
    env = {**os.environ, "MEDGPT_SWEEP": sweep.sweep_dir, "MEDGPT_NPROC_PER_NODE": str(request.nproc),
           "MEDGPT_PYTHON": python}
    script = sbatch_script(request.launcher)
    array = sbatch([f"--array=0-{len(sweep.runs) - 1}", f"--job-name={name}", f"--output={logs}/%x-%A_%a.out",
                    *shlex.split(request.sbatch_args), script], env)
    report = sbatch([f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", f"--job-name={name}-report",
                     f"--output={logs}/%x-%j.out", "--wrap",
                     shlex.join([python, "launcher/report.py", sweep.sweep_dir])], env)
    print(f"sweep: array job {array}: {len(sweep.runs)} runs of {script} (task i = run i of sweep.json), "
          f"logs {logs}/{name}-{array}_<task>.out", flush=True)
    print(f"sweep: report job {report}: launcher/report.py {sweep.sweep_dir}, once every task has succeeded",
          flush=True)
    return array, report
